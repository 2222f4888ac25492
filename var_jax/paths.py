"""Local paths and URLs (gs://bucket/..., any scheme://): which one a path is."""
import os


def is_url(path) -> bool:
  """Whether `path` (a str or os.PathLike, etils' gs:// paths included) names a remote location
  rather than a local file. pathlib would read gs://b/x as the local path 'gs:/b/x'."""
  return "://" in os.fspath(path)

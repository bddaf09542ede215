"""Errors the launchers report as one line."""
import errno


class UserError(Exception):
  """Bad input from the user: the message names the problem and the fix."""


# OSErrors that are the machine's state, not a bug: reported as one line too.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def failure_reason(e: BaseException) -> str:
  """The one line a failed run records: a full disk or another write error names the
  file and the fix; anything else its type and message."""
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return (f'disk full writing {e.filename or "the run"} ({e.strerror}); free space and rerun '
            'the same command: it resumes from the last checkpoint')
  if isinstance(e, OSError) and e.filename:
    return f'{type(e).__name__} on {e.filename}: {e.strerror or e}'
  return f'{type(e).__name__}: {e}'

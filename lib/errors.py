"""The one exception type that launchers turn into a single clear line."""


class UserError(Exception):
  """Bad input from the user: the message names the problem and the fix."""

"""The ablation factors (lib/core/factors.py) as the README's table.

  python -m launch.factors            # print the table
  python -m launch.factors --write    # rewrite README.md's generated section
"""
from absl import flags

from lib.core import cli

_WRITE = flags.DEFINE_bool('write', False, 'Rewrite the factor table of README.md in place.')


def main(argv):
  from lib.core import factors
  if not _WRITE.value:
    print(factors.markdown_table())
    return
  with open('README.md') as f:
    text = f.read()
  new = factors.readme_with_table(text)
  if new != text:
    with open('README.md', 'w') as f:
      f.write(new)
  print('README.md factor table: ' + ('updated' if new != text else 'already current'))


if __name__ == '__main__':
  cli.run(main)

"""python -m lm.config --keys [--markdown]: every config key with its default, allowed values,
resume rule and doc."""

import sys

from lm.config import key_reference

if __name__ == '__main__':
  args = set(sys.argv[1:])
  if '--keys' not in args or args - {'--keys', '--markdown'}:
    sys.exit('usage: python -m lm.config --keys [--markdown]')
  print(key_reference(markdown='--markdown' in args))

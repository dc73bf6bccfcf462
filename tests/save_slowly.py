"""python tests/save_slowly.py [lm.main flags]: lm.main whose checkpoints wait before they commit.

Orbax writes a checkpoint into a temporary folder and renames it when every file is written; here
each rename waits LM_TEST_COMMIT_DELAY_S seconds first (default 2), so a test can kill the process
in the middle of an asynchronous save, its files written and not yet committed.
"""

import asyncio
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from orbax.checkpoint._src.path import atomicity

from lm import cli, main

_commit = atomicity.AtomicRenameTemporaryPath.finalize


async def _commit_slowly(self):
  await asyncio.sleep(float(os.environ.get('LM_TEST_COMMIT_DELAY_S', '2')))
  await _commit(self)


atomicity.AtomicRenameTemporaryPath.finalize = _commit_slowly

if __name__ == '__main__':
  main._define_flags()
  cli.run(main.main)

"""Writes the offline harness tasks' documents (the JSONL beside their YAML) from the three plays of
the Shakespeare validation split (Hamlet, The Comedy of Errors, Antony and Cleopatra), the same every
time (fixed seeds): none of their text is in the training split.

  python -m lm.harness_tasks.build            # rewrites lm/harness_tasks/*.jsonl

- shakespeare_next_line (multiple choice): a scene's last lines, then its true next line against
  three lines from elsewhere in the plays.
- shakespeare_last_word (loglikelihood, LAMBADA-style): a passage and the last word of its last line.
- shakespeare_speaker (generate_until): a scene up to the next speech's `**`; the model writes the
  speaker's name (one who has already spoken in the passage) up to the closing `**`.
- shakespeare_scenes (loglikelihood_rolling): each scene's opening (about 2,000 characters), as bits
  per byte and perplexities.
"""

from __future__ import annotations

import json
import pathlib
import random
import re

from lm.data.builders import SHAKESPEARE_VALIDATION_PLAYS, normalize_text, shakespeare_plays_dir, split_scenes

OUT = pathlib.Path(__file__).parent
DOCS_PER_TASK = 200
SCENE_CHARS = 2000  # Each scene's opening, for the rolling task (the plays whole would be 446 KB).
PASSAGE_CHARS = 400  # Text before each question: about what a 128-token context holds.
_SPEAKER = re.compile(r'^\*\*([A-Z][^*\n]*)\*\*\n', re.MULTILINE)


def validation_scenes() -> list[str]:
  """The validation plays' scenes, in play and scene order."""
  plays = sorted(p for p in shakespeare_plays_dir().glob('*/*.md') if p.stem in SHAKESPEARE_VALIDATION_PLAYS)
  return [scene for play in plays for scene in split_scenes(normalize_text(play.read_text(encoding='utf-8')))]


def _passage_before(scene: str, end: int) -> str:
  """The scene's text before `end`, from the first line start within PASSAGE_CHARS of it."""
  start = max(0, end - PASSAGE_CHARS)
  if start > 0:
    start = scene.index('\n', start) + 1 if '\n' in scene[start:end] else start
  return scene[start:end]


def _verse_lines(scene: str) -> list[tuple[int, str]]:
  """(offset, text) of each spoken line: not a heading, speaker tag, stage direction or blank."""
  lines, offset = [], 0
  for line in scene.split('\n'):
    if line.strip() and not line.startswith(('#', '**', '_')) and len(line.split()) >= 4:
      lines.append((offset, line))
    offset += len(line) + 1
  return lines


def next_line(scenes: list[str], rng: random.Random) -> list[dict]:
  pool = [line for scene in scenes for _, line in _verse_lines(scene)]
  candidates = [(scene, offset, line) for scene in scenes for offset, line in _verse_lines(scene)
                if offset > PASSAGE_CHARS // 2]
  docs = []
  for scene, offset, line in rng.sample(candidates, DOCS_PER_TASK):
    choices = [line] + rng.sample([other for other in pool if other != line], 3)
    rng.shuffle(choices)
    docs.append({'context': _passage_before(scene, offset), 'choices': choices, 'gold': choices.index(line)})
  return docs


def last_word(scenes: list[str], rng: random.Random) -> list[dict]:
  candidates = []
  for scene in scenes:
    for offset, line in _verse_lines(scene):
      match = re.search(r" ([A-Za-z]{3,})[.,;:!?]?$", line)
      if match and offset > PASSAGE_CHARS // 2:
        candidates.append((scene, offset + match.start(), match.group(1)))
  return [{'context': _passage_before(scene, end), 'target': ' ' + word}
          for scene, end, word in rng.sample(candidates, DOCS_PER_TASK)]


def speaker(scenes: list[str], rng: random.Random) -> list[dict]:
  candidates = []
  for scene in scenes:
    for match in _SPEAKER.finditer(scene):
      context = _passage_before(scene, match.start() + 2)  # Up to and with the opening **.
      if match.start() > PASSAGE_CHARS and f'**{match.group(1)}**' in context:
        candidates.append({'context': context, 'target': match.group(1)})
  return rng.sample(candidates, DOCS_PER_TASK)


def scene_texts(scenes: list[str], rng: random.Random) -> list[dict]:
  """Each scene's opening, up to its last blank line within SCENE_CHARS."""
  return [{'text': scene[:scene.rfind('\n\n', 0, SCENE_CHARS) + 1 if len(scene) > SCENE_CHARS else None]}
          for scene in scenes]


TASKS = {'next_line': next_line, 'last_word': last_word, 'speaker': speaker, 'scenes': scene_texts}


def build(out: pathlib.Path = OUT) -> list[pathlib.Path]:
  """Writes each task's documents to out/shakespeare_TASK.jsonl; returns the paths."""
  scenes = validation_scenes()
  paths = []
  for seed, (name, make) in enumerate(TASKS.items()):
    path = out / f'shakespeare_{name}.jsonl'
    path.write_text(''.join(json.dumps(doc, ensure_ascii=False) + '\n' for doc in make(scenes, random.Random(seed))),
                    encoding='utf-8')
    paths.append(path)
  return paths


if __name__ == '__main__':
  for written in build():
    print(f'{written}: {sum(1 for _ in written.open(encoding="utf-8"))} documents')

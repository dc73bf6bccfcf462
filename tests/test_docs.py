"""The README and docs/ say what the code does: every link and anchor resolves, every command line shown
names a real command with flags it defines and config keys that exist, the config reference is the
schema's own, the layout map names every module, and the README stays a front page that CI reads."""

from __future__ import annotations

import functools
import json
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from lm import config as config_lib

DOCS = ROOT / 'docs'
README = ROOT / 'README.md'
PAGES = [README, *sorted(DOCS.glob('*.md'))]
README_MAX_LINES = 260
CI_MARKER = '<!-- ci: tests -->'

_FENCE = re.compile(r'^( *)```[^\n]*\n(.*?)^\1```[ \t]*$', re.M | re.S)
_CODE_SPAN = re.compile(r'`([^`\n]+(?:\n[^`\n]+)*)`')  # Within a paragraph: no blank line inside.
_LINK = re.compile(r'!?\[([^\]]*)\]\(([^)\s]+)\)')
_HEADING = re.compile(r'^#{1,6}[ \t]+(.+?)[ \t#]*$', re.M)
_COMMAND = re.compile(r'python3?\s+-m\s+(lm(?:\.\w+)+)')
_SPAN_COMMAND = re.compile(r'^(lm(?:\.\w+)+)\s+--')  # `lm.generate --weights_dtype=...` in prose.
_CONFIG_KEY = re.compile(r'--config\.([A-Za-z_][\w.]*)')
_REPO_PATH = re.compile(r'(?<![\w/~.-])((?:lm|tests|experiments|notebooks)/[\w./*-]*)')  # `lm/nn/block.py`, ...
_NAMED_KEY = re.compile(r'`((?:model|data|optimizer|train|mesh|eval|checkpoint)\.[a-z_]+)[`=]')
_END_OF_COMMAND = ('&&', '||', '|', ';', '#')
_QUOTED_OUTPUT = ('error:', 'warning:')  # Messages the code prints, quoted (they may name a mistyped key).
PLACEHOLDER_KEYS = {'key', 'group.key'}  # --config.group.key=value: the form, not a key.
OTHER_FLAGS = {'xla_cpu_experimental_ynn_fusion_type'}  # Named in prose, not lm's: XLA's (in XLA_FLAGS).

# How each command defines its flags, where it is not `_define_flags()` of its own module. python -m
# lm.config reads sys.argv itself.
FLAG_DEFINERS = {'lm.bench': ('lm.bench.benchmarks', 'define_flags')}
ARGV_FLAGS = {'lm.config': {'keys', 'markdown'}}

# Runs in a fresh interpreter: every command's flags go into absl's global FLAGS, and commands define
# flags of the same names (--workdir, --step, ...), so each command's are recorded, then removed.
_COLLECT_FLAGS = r'''
import importlib, json, sys
from absl import app, flags
from lm import cli
definers = json.loads(sys.stdin.read())
modules = {c: (importlib.import_module(target), fn) for c, (target, fn) in definers.items()}
app.define_help_flags()
shared = set(flags.FLAGS)  # absl's own (--helpfull, --alsologtostderr, ...) and those libraries define on import.
found = {'': sorted(shared)}
for command, (module, fn) in modules.items():
  define = getattr(module, fn, None)
  if define is None:
    found[command] = None
    continue
  define()
  own = set(flags.FLAGS) - shared
  found[command] = sorted(own)
  for name in own:
    delattr(flags.FLAGS, name)
  cli._config_flag, cli._mesh_only = None, False
print(json.dumps(found))
'''


def _read(page: pathlib.Path) -> str:
  return page.read_text(encoding='utf-8')


def _name(page: pathlib.Path) -> str:
  return str(page.relative_to(ROOT))


def _prose(text: str) -> str:
  """text without its fenced code blocks."""
  return _FENCE.sub('', text)


def _code_lines(text: str) -> list[str]:
  """The command lines of text: each line of its fenced blocks (a line ending in a backslash joined
  with the next), and each inline code span of its prose."""
  lines = []
  for match in _FENCE.finditer(text):
    lines += match.group(2).replace('\\\n', ' ').splitlines()
  lines += [' '.join(span.split()) for span in _CODE_SPAN.findall(_prose(text))]
  return [line for line in lines if not line.strip().startswith(_QUOTED_OUTPUT)]


def github_slug(heading: str) -> str:
  """A heading's anchor as GitHub (and, for the headings here, mkdocs) makes it: the text of any link
  or code, lowercased, punctuation other than - and _ dropped, spaces turned into -."""
  text = _LINK.sub(r'\1', heading).replace('`', '')
  return re.sub(r'[^\w\- ]', '', text.strip().lower()).replace(' ', '-')


def mkdocs_slug(heading: str) -> str:
  """Python-Markdown's toc slugify, which mkdocs uses: runs of spaces and hyphens become one -."""
  text = re.sub(r'[^\w\s-]', '', _LINK.sub(r'\1', heading).replace('`', '')).strip().lower()
  return re.sub(r'[-\s]+', '-', text)


@functools.cache
def anchors(page: pathlib.Path) -> frozenset[str]:
  return frozenset(github_slug(h) for h in _HEADING.findall(_prose(_read(page))))


def _links(page: pathlib.Path) -> list[str]:
  prose = _CODE_SPAN.sub('', _prose(_read(page)))
  return [target for _, target in _LINK.findall(prose)]


def test_the_docs_exist_and_mkdocs_lists_every_page():
  assert {p.name for p in DOCS.glob('*.md')} >= {'index.md', 'config.md', 'api.md', 'layout.md'}
  nav = re.findall(r'^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$', (ROOT / 'mkdocs.yml').read_text(encoding='utf-8'), re.M)
  assert sorted(nav) == sorted(p.name for p in DOCS.glob('*.md')), 'mkdocs.yml nav must list every page of docs/'


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_headings_have_one_anchor_on_github_and_in_mkdocs(page):
  headings = _HEADING.findall(_prose(_read(page)))
  slugs = [github_slug(h) for h in headings]
  assert len(slugs) == len(set(slugs)), f'{_name(page)}: two headings share an anchor: {slugs}'
  differ = [h for h in headings if github_slug(h) != mkdocs_slug(h)]
  assert not differ, f'{_name(page)}: GitHub and mkdocs would anchor these headings differently: {differ}'


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_relative_links_and_anchors_resolve(page):
  broken = []
  for target in _links(page):
    if re.match(r'[a-z]+:', target):  # http(s), mailto: not checked here.
      continue
    path, _, anchor = target.partition('#')
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
      broken.append(f'{target}: no such file')
    elif anchor and (file.suffix != '.md' or anchor not in anchors(file)):
      broken.append(f'{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}')
  assert not broken, f'{_name(page)}: ' + '; '.join(broken)


def _command_exists(command: str) -> bool:
  path = ROOT.joinpath(*command.split('.'))
  return path.with_suffix('.py').is_file() or (path / '__main__.py').is_file()


def _shown_commands() -> list[tuple[pathlib.Path, str, list[str]]]:
  """(page, command, the flag names after it on its command line) for each command line shown."""
  shown = []
  for page in PAGES:
    for line in _code_lines(_read(page)):
      starts = [(m.group(1), m.end()) for m in _COMMAND.finditer(line)]
      if not starts and (m := _SPAN_COMMAND.match(line.strip())):
        starts = [(m.group(1), line.index(m.group(1)) + len(m.group(1)))]
      for command, end in starts:
        if command.rsplit('.', 1)[1].isupper():  # python -m lm.X: the form, not a command.
          continue
        names = []
        for token in line[end:].split():
          if token.startswith(_END_OF_COMMAND):
            break
          if flag := re.match(r'[\[\'"(]*--([A-Za-z_][\w.]*)', token):
            names.append(flag.group(1))
        shown.append((page, command, names))
  return shown


@functools.cache
def command_flags() -> tuple[set[str], dict[str, set[str] | None]]:
  """(the flags every absl command takes, each command's own flags or None if it defines none), for
  the commands the docs show."""
  commands = sorted({c for _, c, _ in _shown_commands() if _command_exists(c)})
  definers = {c: FLAG_DEFINERS.get(c, (c, '_define_flags')) for c in commands if c not in ARGV_FLAGS}
  out = subprocess.run([sys.executable, '-c', _COLLECT_FLAGS], input=json.dumps(definers), capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  found = json.loads(out.stdout.splitlines()[-1])
  shared = set(found.pop(''))
  return shared, {c: None if names is None else set(names) for c, names in found.items()}


def test_every_command_shown_exists_with_the_flags_shown():
  shown = _shown_commands()
  assert len(shown) > 30  # The parsing found the command lines.
  missing = sorted({f'{_name(page)}: python -m {c}' for page, c, _ in shown if not _command_exists(c)})
  assert not missing, f'no such command: {missing}'
  shared, own = command_flags()
  unknown = set()
  for page, command, names in shown:
    if command in ARGV_FLAGS:
      allowed = ARGV_FLAGS[command]
    else:
      allowed = shared | own[command] if own[command] is not None else set()
    for name in names:
      flag = 'config' if name.startswith('config.') else name
      if flag not in allowed and not (flag.startswith('no') and flag[2:] in allowed):
        unknown.add(f'{_name(page)}: python -m {command} --{name}')
  assert not unknown, f'flags these commands do not define: {sorted(unknown)}'


def test_flags_named_in_prose_exist():
  """A flag named on its own in the prose (`lm.generate` takes `--top_k`, ...) is one some command defines."""
  shared, own = command_flags()
  known = shared | OTHER_FLAGS | {n for names in [*own.values(), *ARGV_FLAGS.values()] for n in names or ()}
  unknown = set()
  for page in PAGES:
    for span in _CODE_SPAN.findall(_prose(_read(page))):
      if span.startswith('--'):  # A span that starts with another program's name shows that program's flags.
        unknown |= {f'{_name(page)}: --{n}' for n in re.findall(r'(?:^|\s)--([A-Za-z_]\w*)\b(?!\.)', span)
                    if n not in known}
  assert not unknown, f'flags no command defines: {sorted(unknown)}'


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_config_keys_shown_exist(page):
  text = _read(page)
  flagged = {key for line in _code_lines(text) for key in _CONFIG_KEY.findall(line)}
  named = {k for k in _NAMED_KEY.findall(text) if not k.endswith(('.py', '.safetensors'))}  # File names, not keys.
  unknown = sorted({k.rstrip('.') for k in flagged | named} - set(config_lib.KEYS) - PLACEHOLDER_KEYS)
  assert not unknown, f'{_name(page)} names config keys the schema does not declare: {unknown}'


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_files_named_exist(page):
  """Every path into the repository a page shows (`tests/test_main.py`, --config=experiments/gpt2.py:xl) exists."""
  paths = {m for line in _code_lines(_read(page)) for m in _REPO_PATH.findall(line)}
  missing = sorted(p for p in paths if not re.search(r'[*]|[A-Z]{3,}', p) and not (ROOT / p.rstrip('.')).exists())
  assert not missing, f'{_name(page)} names files that do not exist: {missing}'


def test_config_reference_is_generated_from_the_schema():
  text = _read(DOCS / 'config.md')
  assert 'python -m lm.config --keys --markdown' in text.split('\n| key |', 1)[0]
  table = text[text.index('| key |'):]
  assert table.rstrip('\n') == config_lib.key_reference(markdown=True), (
      'docs/config.md is stale: put the output of python -m lm.config --keys --markdown under its header')


def test_layout_names_every_module():
  layout = _read(DOCS / 'layout.md')
  missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / 'lm').glob('*/*.py'))
             if p.name not in ('__init__.py', '__main__.py') and not re.search(rf'\b{re.escape(p.name)}\b', layout)]
  missing += [f'lm/{p.name}/' for p in sorted((ROOT / 'lm').iterdir())
              if (p / '__init__.py').is_file() and f'lm/{p.name}/' not in layout]
  assert not missing, f'docs/layout.md does not name {missing}'


def test_readme_is_a_front_page_with_the_ci_command():
  text = _read(README)
  assert len(text.splitlines()) <= README_MAX_LINES
  after = text.split(CI_MARKER, 1)[1]
  block = re.search(r'^```bash\n(.*?)^```', after, re.M | re.S)  # What .ci/run runs.
  assert block and 'ruff check .' in block.group(1) and 'pytest' in block.group(1)
  assert block.group(1).index('ruff check .') < block.group(1).index('pytest')
  assert all(f'docs/{p.name}' in text for p in DOCS.glob('*.md') if p.name != 'index.md')  # The table of pages.

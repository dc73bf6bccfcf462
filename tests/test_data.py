import itertools

import grain
import numpy as np
import pytest

from conftest import tiny_config
from lm.config import ConfigError
from lm.data import builders, files, pipeline, tokenizers
from lm.data.packing import PackIterDataset
from lm.training import checkpoint


@pytest.fixture(scope='module')
def shakespeare(tfds_dir):
  return builders.prepare_builder('shakespeare', tfds_dir)


def _texts_and_docs(source):
  rows = [source[i] for i in range(len(source))]
  return [r['text'].decode() for r in rows], {r['doc'].decode() for r in rows}


def test_shakespeare_splits_are_whole_plays_and_disjoint(shakespeare):
  train_texts, train_docs = _texts_and_docs(shakespeare.as_data_source('train'))
  val_texts, val_docs = _texts_and_docs(shakespeare.as_data_source('validation'))
  assert val_docs == set(builders.SHAKESPEARE_VALIDATION_PLAYS)
  assert not train_docs & val_docs and len(train_docs) == 35
  plays = sorted(builders.shakespeare_plays_dir().glob('*/*.md'))
  total = sum(len(builders.normalize_text(p.read_text(encoding='utf-8'))) for p in plays)
  assert sum(map(len, train_texts)) + sum(map(len, val_texts)) == total  # Nothing lost or repeated.


def test_scene_and_chunk_splits_keep_every_character():
  play = (builders.shakespeare_plays_dir() / 'tragedies' / 'macbeth.md').read_text(encoding='utf-8')
  scenes = builders.split_scenes(play)
  assert ''.join(scenes) == play and len(scenes) > 20
  assert all(s.startswith('#') for s in scenes)
  text = 'para one\nline\n\n' * 500 + 'x' * 30_000
  chunks = builders.split_chunks(text, max_chars=1000)
  assert ''.join(chunks) == text and max(map(len, chunks)) <= 2000


def test_text_files_split_by_file(tmp_path):
  for i in range(4):
    (tmp_path / f'{i}.txt').write_text(f'file {i}\n' * 100)
  builder = builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(tmp_path / '*.txt'), 0.25)
  _, train_docs = _texts_and_docs(builder.as_data_source('train'))
  _, val_docs = _texts_and_docs(builder.as_data_source('validation'))
  assert train_docs == {'0.txt', '1.txt', '2.txt'} and val_docs == {'3.txt'}


def test_a_single_text_file_is_cut_at_a_line(tmp_path):
  text = ''.join(f'line {i}\n' for i in range(1000))
  (tmp_path / 'one.txt').write_text(text)
  builder = builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(tmp_path / 'one.txt'), 0.1)
  train, _ = _texts_and_docs(builder.as_data_source('train'))
  val, _ = _texts_and_docs(builder.as_data_source('validation'))
  joined_train, joined_val = ''.join(sorted(train, key=text.index)), ''.join(sorted(val, key=text.index))
  assert joined_train + joined_val == text and joined_val.startswith('line 9')


@pytest.mark.parametrize('content, message', [
    (None, 'no file matches'), (b'', 'is empty'), (b'  \n\n', 'is empty'),
    (b'ok\xff\xfe', 'is not UTF-8 text (byte 0xff at offset 2)'),
])
def test_bad_text_files_are_refused_in_one_line(tmp_path, content, message):
  path = tmp_path / 'corpus.txt'
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    files.resolve_text_files(str(path) + ('*' if content is None else ''))


@pytest.mark.parametrize('kind', ['byte', 'sentencepiece'])
def test_tokenizers_are_lossless_and_count_bytes(shakespeare, kind, tmp_path):
  train_texts, _ = _texts_and_docs(shakespeare.as_data_source('train'))
  tokenizer = tokenizers.load_or_train(kind, 1024, tmp_path, iter(train_texts), 2_000_000)
  val_texts, _ = _texts_and_docs(shakespeare.as_data_source('validation'))
  text = val_texts[0] + 'naïve — “quoted” 日本 \t tabs  and  spaces\n'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert tokenizer.token_bytes[ids].sum() == len(text.encode('utf-8'))
  assert tokenizer.vocab_size <= 1024
  if kind == 'sentencepiece':
    assert len(text.encode()) / len(ids) > 1.5  # Subwords, not bytes.
    reloaded = tokenizers.load_or_train(kind, 1024, tmp_path, iter(()), 0)  # From the workdir copy.
    np.testing.assert_array_equal(reloaded.encode(text), ids)


def _docs_dataset(lengths):
  docs, start = [], 0
  for n in lengths:
    docs.append(np.arange(start, start + n, dtype=np.int32))
    start += n
  return grain.MapDataset.source(docs).to_iter_dataset(), np.arange(start)


def test_packing_loses_no_tokens():
  ds, stream = _docs_dataset([5, 1, 17, 3, 40, 2, 9])
  windows = list(PackIterDataset(ds, seq_len=8, pad_id=-1, pad_final=True))
  tokens = np.stack([w['tokens'] for w in windows])
  for a, b in zip(tokens, tokens[1:]):
    assert a[-1] == b[0]  # Consecutive windows share one token.
  rebuilt = np.concatenate([tokens[0, :1]] + [w['tokens'][1:][w['loss_mask']] for w in windows])
  np.testing.assert_array_equal(rebuilt, stream)  # Every token after the first is a target once.
  assert (tokens[-1][1:][~windows[-1]['loss_mask']] == -1).all()
  dropped = list(PackIterDataset(_docs_dataset([5, 1, 17, 3, 40, 2, 9])[0], seq_len=8, pad_id=-1, pad_final=False))
  assert len(dropped) == len(windows) - 1 and all(w['loss_mask'].all() for w in dropped)


def test_packing_resumes_from_any_position():
  lengths = [5, 1, 17, 3, 40, 2, 9, 30]
  straight = [w['tokens'] for w in PackIterDataset(_docs_dataset(lengths)[0], seq_len=6, pad_id=-1, pad_final=True)]
  for position in range(len(straight)):
    it = iter(PackIterDataset(_docs_dataset(lengths)[0], seq_len=6, pad_id=-1, pad_final=True))
    for _ in range(position):
      next(it)
    state = it.get_state()
    fresh = iter(PackIterDataset(_docs_dataset(lengths)[0], seq_len=6, pad_id=-1, pad_final=True))
    fresh.set_state(state)
    rest = [w['tokens'] for w in fresh]
    assert len(rest) == len(straight) - position
    for a, b in zip(rest, straight[position:]):
      np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def tiny(tfds_dir, play_files, tmp_path_factory):
  config = tiny_config(tfds_dir, play_files)
  return config, pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path_factory.mktemp('tok'))


def _batches(config, corpus, n, seed=None):
  if seed is not None:
    config = config.copy_and_resolve_references()
    config.unlock()
    config.seed = seed
  return list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), n))


def test_same_seed_same_batches_other_seed_other_batches(tiny):
  config, corpus = tiny
  a, b = _batches(config, corpus, 6), _batches(config, corpus, 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  c = _batches(config, corpus, 6, seed=config.seed + 1)
  assert not all(np.array_equal(x['tokens'], y['tokens']) for x, y in zip(a, c))
  assert a[0]['tokens'].shape == (config.data.batch_size, config.data.seq_len + 1)


def test_each_data_shard_reads_its_own_documents_in_a_fixed_order(tiny):
  config, corpus = tiny
  batches = lambda k: iter(pipeline.train_dataset(config.data, corpus, config.seed, k, 2))
  shard = lambda k: [b['tokens'] for b in itertools.islice(batches(k), 4)]
  first, again, second = shard(0), shard(0), shard(1)
  assert first[0].shape == (config.data.batch_size // 2, config.data.seq_len + 1)
  for a, b in zip(first, again):  # A pure function of (seed, step, process) ...
    np.testing.assert_array_equal(a, b)
  rows = lambda batches: {row.tobytes() for b in batches for row in b}
  assert not rows(first) & rows(second)  # ... and the processes' rows never coincide.


def test_a_corpus_shorter_than_one_sequence_is_refused(tfds_dir, tmp_path):
  for name in ('a.txt', 'b.txt'):
    (tmp_path / name).write_text('To be.\n')
  config = tiny_config(tfds_dir, str(tmp_path / '*.txt'), **{'data.tokenizer': 'byte'})
  with pytest.raises(ConfigError, match=r"^data.train_split='train' holds 8 tokens, fewer than one training sequence "
                                        r'\(33 tokens for data.seq_len=32\): add text or lower data.seq_len$'):
    pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')


def test_checkpointed_iterator_continues_without_repeating(tiny, tmp_path):
  config, corpus = tiny
  straight = [b['tokens'] for b in _batches(config, corpus, 30)]
  it = iter(pipeline.train_dataset(config.data, corpus, config.seed))
  for _ in range(11):
    next(it)
  saver = checkpoint.Checkpointer(tmp_path / 'ckpt', config.checkpoint)
  state = {'x': np.zeros(2, np.float32)}
  saver.save(11, state, it)
  saver.close()
  restored_it = iter(pipeline.train_dataset(config.data, corpus, config.seed))
  loader = checkpoint.Checkpointer(tmp_path / 'ckpt', config.checkpoint)
  loader.restore(11, {'x': np.zeros(2, np.float32)}, restored_it)
  loader.close()
  rest = [next(restored_it)['tokens'] for _ in range(19)]
  for a, b in zip(rest, straight[11:]):
    np.testing.assert_array_equal(a, b)
  seen = {b.tobytes() for b in straight[:11]}
  assert not any(r.tobytes() in seen for r in rest)
  # Over 30 batches (about two epochs of this corpus) no window repeats within an epoch's worth.
  windows = [row.tobytes() for b in straight[:8] for row in b]
  assert len(set(windows)) == len(windows)


def test_eval_batches_cover_the_split_once(tiny):
  config, corpus = tiny
  batches = list(pipeline.eval_batches(config.data, corpus, config.seed, config.eval.batch_size))
  assert all(b['tokens'].shape == (config.eval.batch_size, config.data.seq_len + 1) for b in batches)
  encode = lambda i: corpus.tokenizer.encode(corpus.eval_source[i]['text'].decode())
  stream = np.concatenate([np.concatenate([[corpus.tokenizer.bos_id], encode(i)])
                           for i in range(len(corpus.eval_source))])
  targets = np.concatenate([b['tokens'][:, 1:][b['loss_mask']] for b in batches])
  np.testing.assert_array_equal(targets, stream[1:])
  assert len(list(pipeline.eval_batches(config.data, corpus, config.seed, config.eval.batch_size, num_batches=1))) == 1

"""The open families through lm.hf: for each of llama, mistral, mixtral, qwen2, qwen3 and qwen3_moe a tiny
transformers model with every parameter random (norms and biases too; nothing downloaded) imports
with PyTorch's logits, exports back to the same logits, and greedy-decodes transformers' tokens from a
left-padded prompt batch. The RoPE scalings (llama3, linear, dynamic) are checked on the logits."""

import json
import tracemalloc

import jax
import numpy as np
import pytest
from tokenizers import SentencePieceBPETokenizer, Tokenizer, processors
import torch
import transformers

from conftest import tiny_overrides
import lm
from lm import hf, kinds
from lm.config import ConfigError, override, validate
from lm.data.builders import normalize_text, shakespeare_plays_dir
from lm.data.pipeline import Tokenize
from lm.evaluate import evaluate
from lm.generate import generate
from lm.inference.decode import Sampling, generate_ids
from lm.kinds.llama import rope_from_hf
from lm.parallel import sharding
from lm.training import loop, saved
from test_hf import _byte_level_bpe

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-5, max_position_embeddings=96)
FAMILIES = {
    'llama': (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 16})),
    'mistral': (transformers.MistralConfig, dict(sliding_window=8, tie_word_embeddings=False)),
    'mixtral': (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    'qwen2': (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    'qwen3': (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=False)),
    # A dense first block (mlp_only_layers), then experts of their own width; the chosen gates renormalised.
    'qwen3_moe': (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                    mlp_only_layers=[0], norm_topk_prob=True, head_dim=16,
                                                    tie_word_embeddings=False)),
}
ROPES = {
    'linear': dict(rope_parameters={'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 4.0}),
    'dynamic': dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 10000.0, 'factor': 2.0},
                    max_position_embeddings=24),
    'biased': dict(attention_bias=True, mlp_bias=True),  # Llama's biases on every projection.
    'yarn': dict(rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0,
                                  'original_max_position_embeddings': 16, 'beta_fast': 8.0, 'beta_slow': 1.0}),
    'yarn_mscale': dict(rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0, 'mscale': 1.0,
                                         'mscale_all_dim': 0.5, 'original_max_position_embeddings': 16}),
}
TEXT = 'To be, or not to be, that is the question:\nWhether \'tis nobler in the mind to suffer the slings'


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  play = sorted(shakespeare_plays_dir().glob('*/*.md'))[0]
  return _byte_level_bpe([normalize_text(play.read_text(encoding='utf-8'))[:50_000]])


def _hf_folder(folder, tokenizer, config_class, **knobs):
  """A save_pretrained folder of a random model; returns (folder, the torch model)."""
  end = tokenizer.token_to_id('<|endoftext|>')
  config = config_class(**(SHAPE | knobs), vocab_size=tokenizer.get_vocab_size(), bos_token_id=end, eos_token_id=end,
                        pad_token_id=end)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # Norm scales around 1, the rest around 0, none trivial.
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if 'norm' in name else 0.0))
  model.save_pretrained(folder)
  tokenizer.save(str(folder / 'tokenizer.json'))
  return folder, model


def _torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)[None]).logits[0].numpy()


def _lm_logits(run, ids) -> np.ndarray:
  return np.asarray(run.model.apply({'params': run.params}, np.asarray(ids)[None]))[0]


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_family_imports_exports_and_decodes_as_transformers(family, tokenizer, tmp_path):
  config_class, knobs = FAMILIES[family]
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, config_class, **knobs)
  config = hf.import_hf(folder, tmp_path / 'imported')
  assert kinds.hf_family_of(config.model).model_type == family  # The family it would export as.
  run = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  ids = tokenizer.encode(TEXT).ids
  assert len(ids) > 16  # Past llama3's original context and mistral's window.
  ours = _lm_logits(run, ids)
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)

  hf.export_hf(tmp_path / 'imported', tmp_path / 'exported')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  assert type(reloaded) is type(torch_model)
  np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=1e-4, rtol=1e-4)

  # Greedy decoding from a left-padded batch, through lm's KV cache, gives transformers' tokens.
  end = tokenizer.token_to_id('<|endoftext|>')
  prompts = [ids[:11], ids[:4]]
  padded = torch.tensor([[end] * (11 - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (11 - len(p)) + [1] * len(p) for p in prompts])
  torch_model.generation_config.eos_token_id = None  # Neither side stops at (or suppresses) the end token.
  with torch.no_grad():
    theirs = torch_model.generate(padded, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                  pad_token_id=end)[:, 11:].numpy()
  mine = generate_ids(run.model, run.params, [np.asarray(p, np.int32) for p in prompts], max_new_tokens=40,
                      sampling=Sampling(temperature=0.0), rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.stack(mine), theirs)


@pytest.mark.slow  # An import and two models: over 9 s on 2 cores.
def test_mixtral_runs_dropless_to_transformers_logits(tokenizer, tmp_path):
  """model.moe_impl='dropless' on imported Mixtral weights: transformers' logits, and the capacity
  dispatch's where (as imported, moe_capacity_factor=0) nothing is dropped."""
  config_class, knobs = FAMILIES['mixtral']
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, config_class, **knobs)
  hf.import_hf(folder, tmp_path / 'imported')
  run = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  assert run.config.model.moe_capacity_factor == 0
  dropless = kinds.make_model(override(run.config, {'model.moe_impl': 'dropless'}).model, run.config.data)
  ids = np.asarray(tokenizer.encode(TEXT).ids)[None]
  logits = np.asarray(dropless.apply({'params': run.params}, ids))[0]
  np.testing.assert_allclose(logits, _lm_logits(run, ids[0]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits, _torch_logits(torch_model, ids[0].tolist()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('variant', sorted(ROPES))
def test_llama_variants_import_with_transformers_logits(variant, tokenizer, tmp_path):
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, transformers.LlamaConfig, **ROPES[variant])
  hf.import_hf(folder, tmp_path / 'imported')
  run = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  ids = tokenizer.encode(TEXT + TEXT).ids[:48]  # Past the dynamic variant's 24 positions.
  np.testing.assert_allclose(_lm_logits(run, ids), _torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)
  hf.export_hf(tmp_path / 'imported', tmp_path / 'exported')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  np.testing.assert_allclose(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)


def test_what_lm_cannot_represent_is_refused_naming_the_field():
  base = {'max_position_embeddings': 64}
  with pytest.raises(ConfigError, match=r"rope_parameters.rope_type='longrope' in config.json is not supported"):
    rope_from_hf(base | {'rope_parameters': {'rope_type': 'longrope', 'factor': 4.0}})
  with pytest.raises(ConfigError, match=r"rope_parameters.truncate=False in config.json is not supported"):
    rope_from_hf(base | {'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0, 'truncate': False}})
  assert rope_from_hf(base | {'rope_theta': 5e5, 'rope_scaling': {'type': 'linear', 'factor': 2.0}}) == {
      'model.rope_base': 5e5, 'model.rope_scaling': 'linear', 'model.rope_scaling_factor': 2.0}
  llama = transformers.LlamaConfig(**SHAPE, vocab_size=64).to_dict()
  refusals = {'hidden_act': ('gelu', "hidden_act='gelu' in config.json is not supported"),
              'mlp_bias': (True, 'attention_bias=False with mlp_bias=True in config.json is not supported')}
  for field, (value, message) in refusals.items():
    with pytest.raises(ConfigError, match=message):
      kinds.for_hf('llama').config_from_hf(llama | {field: value})
  qwen2 = transformers.Qwen2Config(**SHAPE, vocab_size=64).to_dict()
  with pytest.raises(ConfigError, match="use_sliding_window=True in config.json is not supported"):
    kinds.for_hf('qwen2').config_from_hf(qwen2 | {'use_sliding_window': True})
  mixtral = transformers.MixtralConfig(**SHAPE, vocab_size=64).to_dict()
  with pytest.raises(ConfigError, match="router_jitter_noise=0.1 in config.json is not supported"):
    kinds.for_hf('mixtral').config_from_hf(mixtral | {'router_jitter_noise': 0.1})
  qwen3_moe = transformers.Qwen3MoeConfig(**SHAPE, vocab_size=64, moe_intermediate_size=16).to_dict()
  with pytest.raises(ConfigError, match=r"mlp_only_layers=\[1\] in config.json is not supported"):
    kinds.for_hf('qwen3_moe').config_from_hf(qwen3_moe | {'mlp_only_layers': [1]})
  imported = kinds.for_hf('qwen3_moe').config_from_hf(qwen3_moe | {'mlp_only_layers': [0], 'decoder_sparse_step': 1})
  assert (imported.model.moe_first_dense, imported.model.moe_mlp_dim, imported.model.mlp_dim) == (1, 16, 48)
  # Export: a windowed model is Mistral's, and Llama refuses it by name.
  windowed = kinds.for_hf('mistral').config_from_hf(transformers.MistralConfig(**SHAPE, vocab_size=64).to_dict())
  assert kinds.hf_family_of(windowed.model).model_type == 'mistral'
  with pytest.raises(ConfigError, match="model.sliding_window=4096: a llama checkpoint needs model.sliding_window=0"):
    kinds.hf_family_of(windowed.model, 'llama')
  # A mixture Mixtral cannot express (a shared expert) is refused for export by name.
  shared = kinds.for_hf('mixtral').config_from_hf(mixtral)
  shared.model.moe_shared_experts = 1
  with pytest.raises(ConfigError, match='model.moe_shared_experts=1: a mixtral checkpoint needs '
                                        'model.moe_shared_experts=0'):
    kinds.hf_family_of(shared.model, 'mixtral')


def _llama3_style(texts) -> Tokenizer:
  """Byte-level BPE whose post-processor starts each text with <|begin_of_text|>, as Llama 3's does."""
  tokenizer = _byte_level_bpe(texts)
  tokenizer.add_special_tokens(['<|begin_of_text|>', '<|end_of_text|>'])
  bos = tokenizer.token_to_id('<|begin_of_text|>')
  tokenizer.post_processor = processors.TemplateProcessing(single='<|begin_of_text|> $A',
                                                           special_tokens=[('<|begin_of_text|>', bos)])
  return tokenizer


def _llama2_style(texts) -> Tokenizer:
  """SentencePiece-style BPE (U+2581 for spaces, Metaspace) starting each text with <s>, as Llama 2's does."""
  tokenizer = SentencePieceBPETokenizer()
  tokenizer.train_from_iterator(texts, vocab_size=320, special_tokens=['<unk>', '<s>', '</s>'], show_progress=False)
  tokenizer = Tokenizer.from_str(tokenizer.to_str())
  tokenizer.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  return tokenizer


@pytest.mark.parametrize('style', ['llama3', 'llama2'])
def test_llama_tokenizers_start_documents_and_prompts_as_transformers(style, tmp_path):
  play = sorted(shakespeare_plays_dir().glob('*/*.md'))[0]
  text = normalize_text(play.read_text(encoding='utf-8'))[:50_000]
  tokenizer = (_llama3_style if style == 'llama3' else _llama2_style)([text])
  bos, eos = ('<|begin_of_text|>', '<|end_of_text|>') if style == 'llama3' else ('<s>', '</s>')
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, transformers.LlamaConfig, tie_word_embeddings=False)
  (folder / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': bos, 'eos_token': eos}))
  hf.import_hf(folder, tmp_path / 'imported')
  ours = saved.load(tmp_path / 'imported', devices=jax.devices()[:1]).tokenizer
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  assert (ours.bos_id, ours.eos_id) == (tokenizer.token_to_id(bos), tokenizer.token_to_id(eos))
  # A document as training and evaluation read it, and a prompt, start as tokenizer(text) does.
  document = text[:2000]
  assert list(Tokenize(ours, ('text',)).map({'text': document})) == theirs(document).input_ids
  # Bits per byte count each token's bytes; SentencePiece's Metaspace adds a space before each text
  # (decoded away), which counts as one byte of the document.
  dummy_prefix = 1 if style == 'llama2' else 0
  assert int(ours.token_bytes[ours.encode(document)].sum()) == len(document.encode('utf-8')) + dummy_prefix
  prompt = 'To be, or not to be'
  torch_model.generation_config.eos_token_id = None
  with torch.no_grad():
    new = torch_model.generate(theirs(prompt, return_tensors='pt').input_ids, max_new_tokens=20,
                               do_sample=False)[0, len(theirs(prompt).input_ids):]
  [[continuation]] = generate(tmp_path / 'imported', prompt, max_new_tokens=20, greedy=True, stop_at_end=False)
  assert continuation == theirs.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_an_imported_model_fine_tunes_on_the_plays_and_resumes_bitwise(tokenizer, tmp_path, tfds_dir, play_files):
  config_class, knobs = FAMILIES['qwen3']
  folder, _ = _hf_folder(tmp_path / 'hf', tokenizer, config_class, **knobs)  # GQA, qk-norm, a head_dim apart.
  hf.import_hf(folder, tmp_path / 'imported')
  imported = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  data = dict(dataset='text_files', paths=play_files, tfds_data_dir=tfds_dir, seq_len=32, batch_size=16)
  before = evaluate(imported, **data)
  training = {k: v for k, v in tiny_overrides(tfds_dir, play_files).items() if not k.startswith('model.')}
  config = validate(override(imported.config, training | {
      'checkpoint.init_from': str(tmp_path / 'imported'), 'data.tokenizer': 'huggingface',
      'optimizer.learning_rate': 3e-3, 'eval.num_samples': 0, 'train.steps': 20, 'eval.every': 10,
      'checkpoint.every': 10}))
  straight = loop.Trainer(config, tmp_path / 'straight', devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, straight.state.params, imported.params)  # Starts from the import.
  after = straight.run()
  assert after['tokens'] == before['tokens'] and after['loss'] < before['loss'] - 0.1
  loop.Trainer(config, tmp_path / 'resumed', devices=jax.devices()[:1]).run(stop_after=10)
  resumed = loop.Trainer(config, tmp_path / 'resumed', devices=jax.devices()[:1])
  assert resumed.start_step == 10
  assert resumed.run() == after
  jax.tree.map(np.testing.assert_array_equal, resumed.state.params, straight.state.params)


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_import_streams_into_the_shards_of_a_mesh_and_export_streams_back(tokenizer, tmp_path):
  """A sharded checkpoint imports one tensor at a time into its shards on mesh (1, 8, 1), equal to the
  one-device import; the numpy memory the import holds at its peak is a small part of the parameters.
  Export from that mesh writes several safetensors files that transformers reloads to the same logits."""
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, transformers.LlamaConfig, hidden_size=512,
                                   intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                                   tie_word_embeddings=False)  # 54 MB: more than Python's own allocations.
  sharded = tmp_path / 'sharded'
  torch_model.save_pretrained(sharded, max_shard_size='8MB')
  (sharded / 'tokenizer.json').write_text((folder / 'tokenizer.json').read_text())
  assert len(list(sharded.glob('model-*-of-*.safetensors'))) > 2
  total = sum(p.numel() * 4 for p in torch_model.parameters())
  largest = max(p.numel() * 4 for p in torch_model.parameters())
  tracemalloc.start()
  hf.import_hf(sharded, tmp_path / 'meshed', mesh={'shape': (1, 8, 1)})
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  print(f'import: peak numpy/Python memory {peak / 2**20:.2f} MiB; parameters {total / 2**20:.2f} MiB, '
        f'largest tensor {largest / 2**20:.2f} MiB')
  assert peak < total / 3  # Holding every tensor at once, as an import did before, is > total.
  hf.import_hf(folder, tmp_path / 'single')
  single = saved.load(tmp_path / 'single', devices=jax.devices()[:1])
  meshed = saved.load(tmp_path / 'meshed', devices=jax.devices(), mesh_shape=(1, 8, 1))
  jax.tree.map(np.testing.assert_array_equal, meshed.params, single.params)
  embedding = meshed.params['token_embedding']['embedding']
  assert len({str(s.index) for s in embedding.addressable_shards}) == 8  # Split along embed, not replicated.

  hf.export_hf(tmp_path / 'meshed', tmp_path / 'exported', mesh={'shape': (1, 8, 1)}, devices=jax.devices(),
               max_shard_bytes=8 << 20)
  index = json.loads((tmp_path / 'exported' / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 2 and index['metadata']['total_size'] == total
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  ids = tokenizer.encode(TEXT).ids
  np.testing.assert_allclose(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)


def test_a_bfloat16_checkpoint_imports_as_its_float32_values(tokenizer, tmp_path):
  """Published checkpoints are mostly bfloat16, which numpy cannot read: each tensor comes in as float32."""
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, transformers.Qwen2Config)
  torch_model.to(torch.bfloat16).save_pretrained(folder)
  hf.import_hf(folder, tmp_path / 'imported')
  run = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  ids = tokenizer.encode(TEXT).ids
  reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  np.testing.assert_allclose(_lm_logits(run, ids), _torch_logits(reference, ids), atol=1e-4, rtol=1e-4)


def test_qwen3_moe_streams_onto_an_expert_mesh_with_transformers_logits(tokenizer, tmp_path):
  """A Qwen3-MoE checkpoint of 8 experts imports one tensor at a time onto mesh fsdp=2,expert=4 (each
  device holding 2 experts), equal to the one-device import, and its logits there, the tokens
  exchanged between the experts' devices, are transformers'. lm.pipeline answers as transformers' does."""
  config_class, knobs = FAMILIES['qwen3_moe']
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, config_class, **(knobs | {'num_experts': 8}))
  hf.import_hf(folder, tmp_path / 'meshed', mesh={'shape': 'fsdp=2,expert=4'})
  hf.import_hf(folder, tmp_path / 'single')
  single = saved.load(tmp_path / 'single', devices=jax.devices()[:1])
  meshed = saved.load(tmp_path / 'meshed', devices=jax.devices())
  assert dict(meshed.mesh.shape) == {'data': 1, 'fsdp': 2, 'context': 1, 'expert': 4, 'tensor': 1}
  jax.tree.map(np.testing.assert_array_equal, meshed.params, single.params)
  experts = meshed.params['block_1']['moe']['up_kernel']
  assert {s.data.shape[0] for s in experts.addressable_shards} == {2}  # Split over the expert axis.
  ids = np.asarray(tokenizer.encode(TEXT).ids)
  batch = np.stack([ids[i:i + 16] for i in range(8)])  # The batch splits over fsdp x expert, as in training.
  with sharding.activate(meshed.mesh, sharding.logical_axis_rules(meshed.config.mesh)):
    ours = np.asarray(jax.jit(lambda p, x: meshed.model.apply({'params': p}, x))(meshed.params, batch))
  for row, sequence in zip(ours, batch):
    np.testing.assert_allclose(row, _torch_logits(torch_model, sequence.tolist()), atol=1e-4, rtol=1e-4)
  (folder / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'PreTrainedTokenizerFast',
                                                            'eos_token': '<|endoftext|>'}))
  prompts = ['To be, or not to be', 'Now is the winter', 'O']
  theirs = transformers.pipeline('text-generation', model=str(folder))(prompts, do_sample=False, max_new_tokens=12)
  assert lm.pipeline('text-generation', model=folder)(prompts, do_sample=False, max_new_tokens=12) == theirs

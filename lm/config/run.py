"""The keys of how a run trains: seed, optimizer, train, mesh, eval and checkpoint."""

from __future__ import annotations

import dataclasses

from lm.config.mesh import DEFAULT_LOGICAL_AXIS_RULES, LOGICAL_AXES, MESH_AXES, mesh_sizes, shape_problem
from lm.config.schema import BOOLEAN, FREE, MATCH, Check, choice, integer, key, number, string

OPTIMIZERS = ('adamw', 'lion', 'adafactor', 'muon', 'sgd')
SCHEDULES = ('cosine', 'linear', 'constant', 'inverse_sqrt', 'wsd')
# Named mesh.shape layouts for presets (--config=experiments/gpt2.py:SIZE,LAYOUT); see docs/scaling.md.
MESH_LAYOUTS = {'dp': (-1, 1, 1), 'fsdp': (1, -1, 1), 'hybrid': (-1, 16, 1), 'fsdp_tensor': (1, -1, 4)}


def preset_arg(experiment: str, arg: str, sizes) -> tuple[str, str]:
  """(SIZE, LAYOUT) of a preset's 'SIZE[,LAYOUT]' argument (LAYOUT default 'dp'), or a one-line error."""
  size, _, layout = arg.partition(',')
  layout = layout or 'dp'
  if size not in sizes or layout not in MESH_LAYOUTS:
    raise ValueError(f'{experiment}:{arg}: expected SIZE[,LAYOUT] with SIZE one of {", ".join(sizes)} '
                     f'and LAYOUT one of {", ".join(MESH_LAYOUTS)}')
  return size, layout


def _logical_axis_rules(v):
  if not isinstance(v, (tuple, list)):
    return 'must be a sequence of (logical axis, mesh axes) pairs'
  for rule in v:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      return f'rule {rule!r} must be a (logical axis, mesh axes) pair'
    logical, mesh_axes = rule
    if logical not in LOGICAL_AXES:
      return f'rule {tuple(rule)!r} names unknown logical axis {logical!r}; known: {", ".join(LOGICAL_AXES)}'
    names = mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
    for name in names:
      if name is not None and name not in MESH_AXES:
        return f'rule {tuple(rule)!r} names unknown mesh axis {name!r}; mesh axes: {", ".join(MESH_AXES)}'
  return None


@dataclasses.dataclass(frozen=True)
class Root:
  seed: int = key(0, integer(0, 2**31 - 1), MATCH,
                  'Root of all randomness: init, data order, sampling. Per-step keys fold in the step.')


@dataclasses.dataclass(frozen=True)
class Optimizer:
  name: str = key('adamw', choice(*OPTIMIZERS), MATCH,
                  "'adamw', 'lion', 'adafactor', 'muon' (hidden matrices; AdamW for the rest) or 'sgd' (momentum).")
  learning_rate: float = key(1e-3, number(0, lo_open=True), FREE,
                             'Peak, reached after warmup; then optimizer.schedule to the end of training.')
  schedule: str = key('cosine', choice(*SCHEDULES), FREE,
                      "After warmup: 'cosine' or 'linear' decay to min_lr_ratio, 'constant', 'inverse_sqrt', or "
                      "'wsd' (stable at the peak, then decay over the last decay_fraction of train.steps).")
  warmup_steps: int = key(100, integer(0), FREE, 'Steps of linear warmup from 0 to the peak.')
  min_lr_ratio: float = key(0.1, number(0, 1), FREE,
                            'Final learning rate as a fraction of the peak (cosine, linear, wsd).')
  decay_fraction: float = key(0.2, number(0, 1), FREE,
                              "schedule='wsd': share of train.steps, at the end, over which the rate decays.")
  decay_shape: str = key('linear', choice('linear', 'cosine', 'sqrt'), FREE,
                         "schedule='wsd': the decay's shape; 'sqrt' is 1 - sqrt(progress).")
  b1: float = key(0.9, number(0, 1, hi_open=True), FREE, "Adam's first-moment decay.")
  b2: float = key(0.95, number(0, 1, hi_open=True), FREE, "Adam's second-moment decay.")
  eps: float = key(1e-8, number(0, lo_open=True), FREE, "Adam's epsilon.")
  weight_decay: float = key(0.1, number(0), FREE, 'Decoupled (AdamW); never applied to biases, norms or embeddings.')
  grad_clip_norm: float = key(1.0, number(0), FREE, 'Global-norm clipping threshold; 0 = off.')
  lion_b1: float = key(0.9, number(0, 1, hi_open=True), FREE, "Lion's interpolation of momentum and gradient.")
  lion_b2: float = key(0.99, number(0, 1, hi_open=True), FREE, "Lion's momentum decay.")
  adafactor_decay_rate: float = key(0.8, number(0, 1, lo_open=True), FREE,
                                    "Adafactor's second-moment decay: 1 - step^-this.")
  adafactor_clipping_threshold: float = key(1.0, number(0), FREE, 'Adafactor clips update RMS at this; 0 = off.')
  adafactor_factored: bool = key(True, BOOLEAN, MATCH,
                                 'Adafactor keeps row and column second moments (False: one per parameter).')
  adafactor_parameter_scale: bool = key(False, BOOLEAN, FREE,
                                        'Adafactor scales updates by each parameter block\'s RMS (relative steps).')
  adafactor_momentum: float = key(0.0, number(0, 1, hi_open=True), MATCH,
                                  "Adafactor's first-moment decay; 0 = none (no first-moment state).")
  muon_momentum: float = key(0.95, number(0, 1, hi_open=True), FREE, "Muon's momentum decay.")
  muon_nesterov: bool = key(True, BOOLEAN, FREE, 'Muon orthogonalises Nesterov momentum.')
  muon_ns_steps: int = key(5, integer(1), FREE, "Newton-Schulz iterations of Muon's orthogonalisation.")
  muon_consistent_rms: float = key(0.2, number(0), FREE,
                                   "Muon's update RMS (so AdamW's learning rate serves); 0 = sqrt(max(1, out/in)).")
  muon_adam_learning_rate: float = key(0.0, number(0), FREE,
                                       "Peak rate of muon's AdamW part (embeddings, norms, ...); 0 = learning_rate.")
  sgd_momentum: float = key(0.9, number(0, 1, hi_open=True), FREE, "SGD's momentum; 0 = plain SGD.")
  sgd_nesterov: bool = key(False, BOOLEAN, FREE, 'SGD with Nesterov momentum.')


@dataclasses.dataclass(frozen=True)
class Train:
  steps: int = key(1000, integer(1), FREE, 'Total optimizer steps; the learning-rate schedule ends here.')
  log_every: int = key(10, integer(1), FREE, 'Steps between train metric records.')
  z_loss: float = key(0.0, number(0), FREE,
                      'Weight of the auxiliary loss z_loss * log(sum(exp(logits)))^2 (keeps logits near 0).')
  label_smoothing: float = key(0.0, number(0, 1, hi_open=True), FREE,
                               "Share of each target's probability spread evenly over the vocabulary.")
  moe_balance_loss: float = key(0.01, number(0), FREE,
                                "Weight of the experts' load-balancing loss (mean over MoE layers).")
  mtp_weight: float = key(0.3, number(0), FREE, 'model.mtp_depth > 0: the multi-token losses\' weight: the '
                          'objective adds mtp_weight / mtp_depth times their sum (DeepSeek-V3: 0.3, then 0.1).')
  peak_flops_per_device: float = key(0.0, number(0), FREE, 'For train/mfu: peak FLOP/s of one device; 0 = known '
                                     'TPU/GPU kinds, else the matmul rate measured once per machine and cached.')
  microbatches: int = key(1, integer(1), FREE,
                          "Gradient accumulation: each step's batch is split into this many sequential passes.")
  logits_chunk: int = key(0, integer(0), FREE, 'Positions whose logits the training loss computes at once '
                          '(memory: B x this x V); 0 = all.')
  wandb_project: str = key('', string(), FREE, "Weights & Biases project the run's metrics and samples also go "
                           "to ('' = none; pip install -e '.[wandb]'; WANDB_MODE=offline keeps them local).")
  wandb_entity: str = key('', string(), FREE, "Weights & Biases entity (team or user); '' = the account's default.")
  wandb_run_name: str = key('', string(), FREE, "Weights & Biases run name; '' = the workdir's name.")
  max_nonfinite_steps: int = key(10, integer(0), FREE, 'Non-finite (NaN/Inf) steps are skipped and counted; more '
                                 'than this many in a row stop the run without a new checkpoint. '
                                 '0 = stop at the first.')


@dataclasses.dataclass(frozen=True)
class Mesh:
  shape: tuple | str = key((-1, 1, 1), Check(shape_problem, "sizes or names, e.g. (1, -1, 1, 4) or 'fsdp=-1,tensor=4'"),
                           FREE, 'Devices along (data, fsdp, context, expert, tensor), (data, fsdp, context, '
                           "tensor) or (data, fsdp, tensor) with the others 1, or by name: 'fsdp=-1,tensor=4' "
                           '(unnamed axes 1). One size may be -1: all remaining devices. Resumes compare the sizes '
                           'it resolves to.')
  logical_axis_rules: tuple = key(DEFAULT_LOGICAL_AXIS_RULES, Check(_logical_axis_rules, '(logical axis, mesh axes) '
                                  'pairs'), FREE,
                                  "How the model's logical axes map onto the mesh (lm/parallel/sharding.py).")


@dataclasses.dataclass(frozen=True)
class Eval:
  every: int = key(200, integer(1), FREE, 'Steps between evaluations (and samples); training always ends with one.')
  num_batches: int = key(8, integer(0), FREE, 'Batches per periodic eval; 0 = the whole split.')
  final_num_batches: int = key(0, integer(0), FREE, 'Batches of the eval that ends training; 0 = the whole split.')
  batch_size: int = key(32, integer(1), FREE, 'Sequences per eval batch.')
  sample_prompt: str = key('', string(), FREE, "Text the samples continue; '' = start of a document.")
  sample_tokens: int = key(128, integer(0), FREE,
                           'New tokens per sample (fewer if the prompt leaves less room in max_len).')
  num_samples: int = key(2, integer(0), FREE, 'Samples drawn at each evaluation.')
  sample_temperature: float = key(0.8, number(0, lo_open=True), FREE, 'Temperature of those samples.')
  harness_tasks: str = key('', string(), FREE, 'lm-evaluation-harness tasks run during training, comma-separated '
                           "(e.g. 'shakespeare'; python -m lm.harness --list_tasks); '' = none.")
  harness_every: int = key(0, integer(0), FREE, 'Steps between those harness runs; 0 = only when training ends '
                           '(it always ends with one).')
  harness_limit: int = key(0, integer(0), FREE, 'Documents per harness task in those runs; 0 = all.')


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  every: int = key(200, integer(1), FREE, 'Steps between checkpoints; training always ends with one.')
  every_minutes: float = key(0.0, number(0), FREE,
                             'Also checkpoint when this many minutes passed since the last one; 0 = off.')
  max_to_keep: int = key(3, integer(1), FREE, 'Checkpoints kept; older ones are deleted.')
  async_save: bool = key(True, BOOLEAN, FREE, 'Write checkpoints in the background while training continues.')
  init_from: str = key('', string(), FREE,
                       'A workdir whose parameters (and tokenizer) start a fresh run: fine-tuning, or a branch.')
  init_step: int = key(-1, integer(-1), FREE, 'The step of init_from to start from; -1 = its latest checkpoint.')
  init_mode: str = key('params', choice('params', 'full'), FREE,
                       "'params': init_from's parameters, a fresh optimizer at step 0; 'full': its whole state "
                       '(parameters, optimizer, step, data position), e.g. to branch a WSD cooldown off a run.')


def decay_start(o, steps: int) -> int:
  """The step at which schedule='wsd' leaves its stable phase: the last decay_fraction of `steps` decay."""
  return steps - round(o.decay_fraction * steps)


def rules(c) -> list[str]:
  errors = []
  if c.optimizer.warmup_steps >= c.train.steps:
    errors.append(f'optimizer.warmup_steps={c.optimizer.warmup_steps} must be < train.steps={c.train.steps}')
  o = c.optimizer
  if o.schedule == 'wsd' and decay_start(o, c.train.steps) < o.warmup_steps:
    errors.append(f'optimizer.decay_fraction={o.decay_fraction} starts the decay before optimizer.warmup_steps='
                  f'{o.warmup_steps} ends (train.steps={c.train.steps})')
  k = c.checkpoint
  for name, value, default in (('init_step', k.init_step, -1), ('init_mode', k.init_mode, 'params')):
    if value != default and not k.init_from:
      errors.append(f'checkpoint.{name}={value!r} needs checkpoint.init_from: the workdir to start from')
  if c.data.batch_size % c.train.microbatches:
    errors.append(f'data.batch_size={c.data.batch_size} must be divisible by train.microbatches={c.train.microbatches}')
  if c.eval.harness_tasks and c.model.kind != 'decoder':
    errors.append(f"eval.harness_tasks={c.eval.harness_tasks!r} needs model.kind='decoder' (the harness scores "
                  'decoders)')
  for name in ('harness_every', 'harness_limit'):
    if c.eval[name] and not c.eval.harness_tasks:
      errors.append(f'eval.{name}={c.eval[name]} needs eval.harness_tasks: the tasks to run')
  context = mesh_sizes(c.mesh.shape)[2]
  if context > 1 and c.data.seq_len % context:
    errors.append(f'data.seq_len={c.data.seq_len} must be divisible by the context axis of mesh.shape='
                  f'{c.mesh.shape!r} ({context})')
  if context != 1 and c.model.kind != 'decoder':
    errors.append(f"the context axis of mesh.shape={c.mesh.shape!r} needs model.kind='decoder' "
                  f'(not {c.model.kind!r})')
  if (c.train.wandb_entity or c.train.wandb_run_name) and not c.train.wandb_project:
    errors.append('train.wandb_entity and train.wandb_run_name need train.wandb_project')
  return errors

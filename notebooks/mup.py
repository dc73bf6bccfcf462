# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]

# %% [markdown]
# # muP: one learning rate across widths
#
# Under the standard parametrization (SP) the best learning rate of an Adam-type optimizer falls as
# the model widens, so a rate tuned on a small model does not carry to a large one. muP
# (`model.parametrization='mup'`, Yang et al.'s Tensor Programs V) scales the hidden matrices' init
# variance and learning rate by 1/m, the output logits by 1/m and the attention scores by
# 1/sqrt(head_dim * m), with m = d_model / `model.mup_base_width`; at the base width it is SP
# exactly. Its promise: the best rate found at the base width is the best at every width.
#
# The sweep in `experiments/ablations/mup.py`: the baseline of `experiments/ablations/base.py` (a
# byte-level GPT, 4 layers and 4 heads, AdamW, on the Shakespeare plays) trained 250 steps at widths
# 32, 64 and 128 and five peak learning rates a factor of two apart, under SP and under muP with base
# width 32 (so width 32 runs under SP only: it is both). From a shell:
#
# ```
# python -m lm.sweep --config=experiments/ablations/mup.py --workdir=runs/ablations/mup
# ```

# %% tags=["parameters"]
SMOKE = False  # True: every point trains 4 steps (what the tests run): proves the notebook runs, not the science.
WORKDIR = '../runs/ablations/mup'
OVERRIDES = {}  # Config overrides for every point, e.g. {'data.tfds_data_dir': '/data/tfds'}.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from lm import results

launched = results.launch_ablation('../experiments/ablations/mup.py', WORKDIR, OVERRIDES, smoke=SMOKE)
runs = results.load_runs(WORKDIR)

# %% [markdown]
# ## The transfer plot
#
# Final validation bits per byte (the whole validation split) against the peak learning rate, one
# line per width; the base width's runs appear in both panels.

# %%
base_width = runs['model.mup_base_width'].iloc[0]
at_base = runs[runs['model.d_model'] == base_width]
panels = {'SP': runs[runs['model.parametrization'] == 'sp'],
          'muP': pd.concat([at_base, runs[runs['model.parametrization'] == 'mup']])}
fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, (title, panel) in zip(axes, panels.items()):
  results.plot_final(panel, 'optimizer.learning_rate', logx=True, by='model.d_model', ax=ax)
  ax.set_title(title)
plt.show()

# %% [markdown]
# The best learning rate at each width, and its score:

# %%
best = {title: panel.loc[panel.groupby('model.d_model')['eval/bits_per_byte'].idxmin()]
        .set_index('model.d_model')[['optimizer.learning_rate', 'eval/bits_per_byte']]
        for title, panel in panels.items()}
pd.concat(best, axis=1).round(4)

# %%
results.table(runs).round(4)

# %% [markdown]
# ## The coordinate check
#
# Mean |x| of each block's output on one batch after 3 AdamW steps at learning rate 1e-2 (no warmup,
# no clipping), from widths 64 to 512 (base width 64; `lm.coordinates`, as `tests/test_mup.py`
# checks). Under muP it keeps its size as the model widens; under SP the updates grow with the
# width, and so do the activations.

# %%
import tempfile

from lm.config import load_experiment, override
from lm.coordinates import block_output_sizes
from lm.data import pipeline

widths = [32, 64] if SMOKE else [64, 128, 256, 512]
coordinate_base = load_experiment('../experiments/ablations/mup.py' + (':smoke' if SMOKE else ''))
coordinate_base = override(coordinate_base, OVERRIDES | {
    'optimizer.learning_rate': 1e-2, 'optimizer.warmup_steps': 0, 'optimizer.grad_clip_norm': 0.0,
    'model.mup_base_width': widths[0]})
corpus = pipeline.load_corpus(coordinate_base.data, coordinate_base.model.vocab_size, tempfile.mkdtemp())
sizes = pd.DataFrame([{'parametrization': p, 'd_model': w, **block_output_sizes(
    override(coordinate_base, {'model.d_model': w, 'model.parametrization': p}), corpus)}
    for p in ('sp', 'mup') for w in widths])
sizes.set_index(['parametrization', 'd_model']).round(3)

# %%
blocks = [c for c in sizes.columns if c.startswith('block_')]
fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, p in zip(axes, ('sp', 'mup')):
  for block in blocks:
    rows = sizes[sizes['parametrization'] == p]
    ax.plot(rows['d_model'], rows[block], marker='o', label=block)
  ax.set(title={'sp': 'SP', 'mup': 'muP'}[p], xlabel='d_model', ylabel='mean |block output|', xscale='log',
         yscale='log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
plt.show()

# %% [markdown]
# ## What this run found
#
# FINDINGS

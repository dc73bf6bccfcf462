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
# # Optimizers
#
# AdamW, Lion, Adafactor, Muon and SGD with momentum, each at its own best peak learning rate: a
# sweep in factors of two (about three for SGD) around where each is known to work, extended where
# the first three rates left the optimum at an end. The schedule (50 warmup steps, cosine decay),
# weight decay 0.1 (decoupled, never on biases, norms or embeddings) and clipping at norm 1 are the
# same for all. Muon orthogonalises the momentum of the attention and MLP kernels and updates the
# embeddings, norms and biases with AdamW, its update scaled to AdamW's RMS, so it shares AdamW's
# learning rate.
#
# Every point trains the baseline of `experiments/ablations/base.py` (a byte-level GPT, 4 layers,
# width 64, on the Shakespeare plays, 500 steps) with one change, from the sweep in
# `experiments/ablations/optimizers.py`. The same sweep from a shell, or on a cluster:
#
# ```
# python -m lm.sweep --config=experiments/ablations/optimizers.py --workdir=runs/ablations/optimizers \
#     [--launcher=slurm]
# ```
#
# Runs that are already finished in `WORKDIR` are read, not run again; unfinished ones resume.

# %% tags=["parameters"]
SMOKE = False  # True: every point trains 4 steps (what the tests run): proves the notebook runs, not the science.
WORKDIR = '../runs/ablations/optimizers'
OVERRIDES = {}  # Config overrides for every point, e.g. {'data.tfds_data_dir': '/data/tfds'}.

# %%
import matplotlib.pyplot as plt

from lm import results

launched = results.launch_ablation('../experiments/ablations/optimizers.py', WORKDIR, OVERRIDES, smoke=SMOKE)

# %% [markdown]
# ## Each optimizer at its best learning rate
#
# Final validation loss over the whole validation split (Hamlet, The Comedy of Errors, Antony and
# Cleopatra: 428K bytes), in bits per byte; `- best` is each run's gap to the best one. The training
# speed is the median over each run's logged steps, from runs one after another on the same machine
# (`python -m lm.bench optimizers` measures it side by side).

# %%
runs = results.load_runs(WORKDIR)
best = runs.loc[runs.groupby('optimizer.name', sort=False)['eval/bits_per_byte'].idxmin()]
results.table(best, metrics=('eval/bits_per_byte', 'eval/loss', 'train/tokens_per_second'),
              by=['optimizer.name', 'optimizer.learning_rate']).round(4)

# %%
results.plot_losses(results.load_curves(WORKDIR).query('run in @best.run'))
plt.show()

# %% [markdown]
# ## Every learning rate
#
# The final score against the peak learning rate, one line per optimizer: where each one's optimum
# sits, and how wide its basin is.

# %%
results.plot_final(runs, 'optimizer.learning_rate', logx=True, by='optimizer.name')
plt.show()

# %%
results.table(runs).round(4)

# %%
print(results.ranking(runs))

# %% [markdown]
# ## What this run found
#
# FINDINGS

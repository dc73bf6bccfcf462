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
# # WSD against cosine, and cooldowns branched from one run
#
# Warmup-stable-decay holds the peak learning rate after warmup and decays only over the last
# `optimizer.decay_fraction` of `train.steps` (here 20%, linearly to zero); warmup-cosine decays from
# the end of warmup on. Because WSD's stable phase does not depend on the budget, one stable run
# yields a model at every budget: branch a short cooldown off any of its checkpoints
# (`checkpoint.init_from=` the stable run, `checkpoint.init_step=N`, `checkpoint.init_mode='full'`:
# parameters, optimizer state, step and data position). A cosine schedule fixes its budget at the
# start, so each budget is a new run from scratch.
#
# The sweep in `experiments/ablations/wsd.py`, on the baseline of `experiments/ablations/base.py`
# (a byte-level GPT, 4 layers, width 64, on the Shakespeare plays, peak learning rate 3e-3):
# cosine and WSD at 500 steps; cooldowns from the WSD run's checkpoints at steps 100, 200 and 300 to
# budgets of 125, 250 and 375 steps (each decay is 20% of its budget); and cosine runs at those
# budgets to compare. The cooldowns start only once the stable run has finished. From a shell:
#
# ```
# python -m lm.sweep --config=experiments/ablations/wsd.py --workdir=runs/ablations/wsd
# ```

# %% tags=["parameters"]
SMOKE = False  # True: every point trains at most 4 steps (what the tests run): proves the notebook runs.
WORKDIR = '../runs/ablations/wsd'
OVERRIDES = {}  # Config overrides for every point, e.g. {'data.tfds_data_dir': '/data/tfds'}.

# %%
import matplotlib.pyplot as plt

from lm import results

launched = results.launch_ablation('../experiments/ablations/wsd.py', WORKDIR, OVERRIDES, smoke=SMOKE)
runs = results.load_runs(WORKDIR)
curves = results.load_curves(WORKDIR)
runs['schedule'] = [f'{s}, cooldown from step {n}' if m == 'full' else s for s, m, n in
                    zip(runs['optimizer.schedule'], runs['checkpoint.init_mode'], runs['checkpoint.init_step'])]

# %% [markdown]
# ## The same budget: cosine against WSD
#
# Final validation loss over the whole validation split (428K bytes), in bits per byte, and the
# learning rate each schedule followed.

# %%
full = runs[runs['train.steps'] == runs['train.steps'].max()]
results.table(full, by=['optimizer.schedule']).round(4)

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
results.plot_curves(curves.query('run in @full.run'), 'eval/bits_per_byte', ax=left)
results.plot_curves(curves.query('run in @full.run'), 'train/learning_rate', ax=right)
plt.show()

# %% [markdown]
# ## A loss at every budget from one run
#
# Each budget's final score: WSD's from the stable run's cooldowns (and its own decay at the full
# budget), cosine's from a run per budget. The grey line is the stable run's evaluations before its
# decay: what the cooldowns start from.

# %%
wsd = runs[runs['optimizer.schedule'] == 'wsd']
cosine = runs[runs['optimizer.schedule'] == 'cosine']
stable = curves[(curves['run'] == 'schedule=wsd') & curves['eval/bits_per_byte'].notna()]
decay = runs.loc[runs['run'] == 'schedule=wsd', 'train.steps'].iloc[0] * (1 - runs['optimizer.decay_fraction'].iloc[0])
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.plot(stable['step'][stable['step'] <= decay], stable['eval/bits_per_byte'][stable['step'] <= decay],
        color='grey', marker='.', label='WSD stable phase')
for name, group in (('WSD: cooldowns from one run', wsd), ('cosine: one run per budget', cosine)):
  group = group.sort_values('train.steps')
  ax.plot(group['train.steps'], group['eval/bits_per_byte'], marker='o', label=name)
ax.set(xlabel='budget (train.steps)', ylabel='final eval/bits_per_byte')
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %%
table = runs.pivot_table(index='train.steps', columns='optimizer.schedule', values='eval/bits_per_byte')
table['wsd - cosine'] = table['wsd'] - table['cosine']
table['steps trained: wsd'] = [n if n == runs['train.steps'].max() else n - wsd.loc[wsd['train.steps'] == n,
                               'checkpoint.init_step'].iloc[0] for n in table.index]
table.round(4)

# %%
print(results.ranking(runs))

# %% [markdown]
# ## What this run found
#
# FINDINGS

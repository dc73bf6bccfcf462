# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Mixture of experts: dense vs MoE, coarse vs fine-grained, auxiliary loss vs bias
#
# Five runs of the baseline of `experiments/ablations/base.py` (a byte-level GPT, 4 layers, width 64,
# on the Shakespeare plays), from the sweep in `experiments/ablations/moe.py`:
#
# - **dense**: the baseline's GELU MLP, 256 wide (`moe_experts=0`);
# - **coarse**: 8 experts of width 128, top-2 (`model.moe_impl='dropless'`: no token dropped);
# - **fine**: 32 experts of width 32, top-8: each coarse expert split in four (DeepSeekMoE's
#   fine-grained segmentation), so the same total (4x the dense MLP) and active parameters;
#
# and the fine-grained experts balanced three ways: by the Switch auxiliary loss
# (`train.moe_balance_loss=0.01`, the default, in *coarse* and *fine*), by DeepSeek-V3's bias
# (`model.moe_router_bias=True`, `model.moe_bias_rate=0.001`, no loss), or not at all. Every MoE
# point has the dense model's active MLP width, so its FLOPs per token are the dense model's plus the
# router's. The same sweep from a shell, or on a cluster:
#
# ```
# python -m lm.sweep --config=experiments/ablations/moe.py --workdir=runs/ablations/moe [--launcher=slurm]
# ```
#
# Runs that are already finished in `WORKDIR` are read, not run again; unfinished ones resume.

# %% tags=["parameters"]
SMOKE = False  # True: every point trains 4 steps (what the tests run): proves the notebook runs, not the science.
WORKDIR = '../runs/ablations/moe'
OVERRIDES = {}  # Config overrides for every point, e.g. {'data.tfds_data_dir': '/data/tfds'}.

# %%
from lm.analysis import results

launched = results.launch_ablation('../experiments/ablations/moe.py', WORKDIR, OVERRIDES, smoke=SMOKE)

# %% [markdown]
# ## Final validation loss
#
# Scored over the whole validation split (Hamlet, The Comedy of Errors, Antony and Cleopatra: 428K
# bytes), in bits per byte; `- best` is each run's gap to the best one.

# %%
results.report(WORKDIR)

# %% [markdown]
# ## Load balance over training
#
# `train/moe/imbalance`: the most loaded expert's token-expert pairs over the mean, in the worst
# layer, every 50 steps (1 would be perfectly even; 32 experts at top-8 give at most 4).

# %%
curves = results.load_curves(WORKDIR)


def label(run):
  if not run['model.moe_experts']:
    return 'dense'
  kind = 'coarse' if run['model.moe_experts'] == 8 else 'fine'
  if run.get('model.moe_router_bias') is True:
    return f'{kind}, bias'
  return f'{kind}, aux loss' if run.get('train.moe_balance_loss') != 0 else f'{kind}, none'


curves['point'] = curves.apply(label, axis=1)
print(curves.pivot_table(index='step', columns='point', values='train/moe/imbalance').round(2).to_string())

# %% [markdown]
# ## What this run found
#
# In the committed run (one seed per point), every mixture beat the dense model at the same active
# width, and the fine-grained experts balanced by the bias did best: **3.307** bits per byte, against
# 3.327 for the coarse experts (8, top-2), 3.333 for the same fine-grained experts under the auxiliary
# loss, 3.359 for the dense model (the baseline's own number) and 3.364 for the fine-grained experts
# with no balancing at all. Three seeds of the baseline spread by a standard deviation of 0.024
# (notebooks/mlp), so only the gaps of about two of those are more than suggestive: bias against
# dense (0.052) and bias against no balancing (0.057); coarse against fine under the same loss
# (0.006) is no difference at this size.
#
# The load tells the clearer story. Unbalanced, the fine-grained router collapsed at once: its worst
# layer sent 3.6-4.0 times the mean to its busiest expert all run long (4 is the most possible: all
# of a token's 8 choices among 32 experts landing on the same 8 experts); its experts then act as one
# MLP a quarter of the width, and it ended behind the dense model. The auxiliary loss held the worst
# layer near 2x (1.8-2.2 after step 100, coarse experts 1.6-2.6); the bias brought it to 1.2-1.9
# (1.42 at the end) while adding nothing to the loss the model optimises, which is DeepSeek-V3's
# argument for it. Each MoE point took 2.2-3.5 minutes against 1.7 for the dense model on 2 CPU cores
# (the dropless experts' grouped products cost more here than a dense MLP's matmul: see docs/speed.md).

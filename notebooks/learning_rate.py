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
# # Learning rate sweep
#
# The peak learning rate of the warmup + cosine schedule, in factors of two from a quarter of the
# baseline's 3e-3 to 16 times it (AdamW, weight decay 0.1, 50 warmup steps, gradients clipped at
# norm 1).
#
# Every point trains the baseline of `experiments/ablations/base.py` (a byte-level GPT, 4 layers,
# width 64, on the Shakespeare plays) with one change, from the sweep in
# `experiments/ablations/learning_rate.py`. The same sweep from a shell, or on a cluster:
#
# ```
# python -m lm.sweep --config=experiments/ablations/learning_rate.py --workdir=runs/ablations/learning_rate \
#     [--launcher=slurm]
# ```
#
# Runs that are already finished in `WORKDIR` are read, not run again; unfinished ones resume.

# %% tags=["parameters"]
SMOKE = False  # True: every point trains 4 steps (what the tests run): proves the notebook runs, not the science.
WORKDIR = '../runs/ablations/learning_rate'
OVERRIDES = {}  # Config overrides for every point, e.g. {'data.tfds_data_dir': '/data/tfds'}.

# %%
import matplotlib.pyplot as plt

from lm.analysis import results

launched = results.launch_ablation('../experiments/ablations/learning_rate.py', WORKDIR, OVERRIDES, smoke=SMOKE)

# %% [markdown]
# ## Final validation loss
#
# Scored over the whole validation split (Hamlet, The Comedy of Errors, Antony and Cleopatra: 428K
# bytes), in bits per byte; `- best` is each run's gap to the best one.

# %%
runs = results.load_runs(WORKDIR)
results.table(runs).round(4)

# %%
results.plot_losses(results.load_curves(WORKDIR))
plt.show()

# %% [markdown]
# The final score against the learning rate, on a log axis: the optimum, and how flat the basin is.

# %%
results.plot_final(runs, 'optimizer.learning_rate', logx=True)
plt.show()

# %%
print(results.ranking(runs))

# %% [markdown]
# ## What this run found
#
# In the committed run the optimum sits at **1.2e-2**, four times the baseline's 3e-3: **3.135**
# bits per byte, against 3.215 at 6e-3, 3.359 at 3e-3, 3.494 at 1.5e-3 and 3.593 at 7.5e-4. Above
# it the loss jumps: 3.677 at 2.4e-2 and 3.719 at 4.8e-2, both behind from the first evaluation
# (4.38 bits per byte at step 100 against 3.85), the signature of a rate too high for 50 warmup
# steps. So the basin is steep on the high side and gentle on the low side, and every other
# ablation here ran a factor of four below this model's best rate: their differences are measured
# at the baseline's rate, not at each variant's own optimum. The seven points took 22.5 minutes of
# compiling, training and evaluating on 2 shared CPU cores (3-4.5 minutes each; the 3e-3 point is
# the baseline run, shared).

"""The scaling-law fit recovers a known law, and its compute-optimal allocation is the true minimum."""

from __future__ import annotations

import numpy as np
import scipy.optimize

from lm import results

TRUE = dict(E=1.6, A=60.0, alpha=0.4, B=400.0, beta=0.35)


def _points(noise: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  n = np.repeat([2e4, 5e4, 1e5, 2e5, 5e5, 1e6], 5)
  d = np.tile([1e5, 2e5, 4e5, 8e5, 1.6e6], 6)
  loss = (TRUE['E'] + TRUE['A'] / n ** TRUE['alpha'] + TRUE['B'] / d ** TRUE['beta']) * np.exp(noise * rng.standard_normal(n.size))
  return n, d, loss, np.repeat(np.arange(6), 5)


def test_fit_recovers_a_known_law_and_its_uncertainty_covers_it():
  n, d, loss, runs = _points(noise=0.0)
  exact = results.fit_scaling_law(n, d, loss, groups=runs, bootstraps=0)
  for name, value in TRUE.items():
    np.testing.assert_allclose(getattr(exact, name), value, rtol=1e-3, err_msg=name)
  assert exact.residual_rms < 1e-6

  n, d, loss, runs = _points(noise=0.01)
  noisy = results.fit_scaling_law(n, d, loss, groups=runs, bootstraps=60)
  assert len(noisy.samples) >= 50
  for name in ('alpha', 'beta', 'E'):
    assert 0 < noisy.stderr[name] < 0.5 * TRUE[name], name
    assert abs(getattr(noisy, name) - TRUE[name]) < 4 * noisy.stderr[name] + 0.02, (name, getattr(noisy, name))
    low, high = noisy.interval[name]
    assert low < high and low - 3 * noisy.stderr[name] < TRUE[name] < high + 3 * noisy.stderr[name], name
  np.testing.assert_allclose(noisy.predict(n, d), loss, rtol=0.05)


def test_optimal_params_minimise_the_fitted_loss_at_fixed_compute():
  n, d, loss, runs = _points(noise=0.0)
  fit = results.fit_scaling_law(n, d, loss, groups=runs, bootstraps=0)
  assert np.isclose(fit.params_exponent, TRUE['beta'] / (TRUE['alpha'] + TRUE['beta']), rtol=1e-3)
  for compute in (1e12, 1e15, 1e18):
    numeric = scipy.optimize.minimize_scalar(lambda log_n: fit.predict(np.exp(log_n), compute / (6 * np.exp(log_n))),
                                             bounds=(0, 60), method='bounded').x
    np.testing.assert_allclose(np.log(fit.optimal_params(compute)), numeric, atol=1e-3)

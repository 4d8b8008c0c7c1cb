r"""Convergence order of the deterministic samplers against the exact probability-flow ODE solution.

With Gaussian data x0 ~ N(MU, SD^2) the optimal denoiser is known in closed form and the ODE maps the start state
affinely to every other noise level (`diffusion/gaussian_oracle.py`). Each sampler runs from the same x_T with the exact
denoiser; the error is the max-abs difference between its state and the exact solution at a noise level that every
step count reaches: the last level before the final jump to sigma = 0 where that level is fixed (Karras levels,
flow), the end itself for DDIM (alphas_cumprod[0]), and the state at t = 199 on the SD schedule with 'trailing'
spacing (its last levels move towards t = 0 as steps grow). The observed order is -d log(error) / d log(steps),
fitted over the three largest step counts.

  python scripts/convergence_order.py                 # prints the markdown table of docs/samplers.md
  python scripts/convergence_order.py --steps 5,10,20,40,100 --out table.md
"""

import sys
import time

import numpy as np
from absl import flags

from diffusion import cli, process
from diffusion import gaussian_oracle as oracle
from diffusion.errors import user_errors_exit

_STEPS = flags.DEFINE_string('steps', '5,10,20,40,100', 'Comma-separated step counts (divisors of 1000), at least 3.')
_OUT = flags.DEFINE_string('out', None, 'Also write the table to this file.')

EDM = dict(schedule='edm', num_train_timesteps=1000)
VP = dict(schedule='scaled_linear', num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
FLOW = dict(schedule='flow', num_train_timesteps=1000)
# (sampler, schedule config, prediction type, options, expected order)
CASES = (
  ('ddim', VP, 'eps', dict(timestep_spacing='trailing'), 1),
  ('euler', EDM, 'v', dict(karras=True), 1),
  ('heun', EDM, 'v', dict(karras=True), 2),
  ('dpmpp_2m', EDM, 'v', dict(karras=True), 2),
  ('euler', VP, 'eps', dict(timestep_spacing='trailing', measure_t=199), 1),
  ('heun', VP, 'eps', dict(timestep_spacing='trailing', measure_t=199), 2),
  ('dpmpp_2m', VP, 'eps', dict(timestep_spacing='trailing', measure_t=199), 2),
  ('flow_euler', FLOW, 'flow', {}, 1),
  ('flow_heun', FLOW, 'flow', {}, 2),
)


def table(steps: list[int], x_T: np.ndarray) -> list[str]:
  head = ' | '.join(f'{n} steps' for n in steps)
  rows = [f'| sampler | schedule | expected | {head} | observed order |', '|' + '---|' * (len(steps) + 4)]
  for name, config, prediction_type, options, expected in CASES:
    schedule = process.get_noise_schedule(config)
    errors = [oracle.ode_error(name, schedule, prediction_type, n, x_T, **options) for n in steps]
    order = -np.polyfit(np.log(steps[-3:]), np.log(errors[-3:]), 1)[0]
    label = (
      config['schedule']
      + (' (Karras)' if options.get('karras') else '')
      + (f', {options["timestep_spacing"]}' if 'timestep_spacing' in options else '')
      + (f', at t = {options["measure_t"]}' if 'measure_t' in options else '')
    )
    cells = ' | '.join(f'{e:.2e}' for e in errors)
    rows.append(f'| {name} | {label} | {expected} | {cells} | {order:.2f} |')
  return rows


@user_errors_exit
def main(argv: list[str]) -> None:
  cli.parse_flags(argv, config_flag=None, doc=__doc__)
  steps = cli.comma_list(_STEPS, int, minimum=1)
  cli.require(len(steps) >= 3, f'--steps needs at least 3 step counts to fit an order, got {_STEPS.value!r}')
  x_T = oracle.normal(0, (64, 2, 2, 2))
  start = time.time()
  rows = table(steps, x_T)
  text = '\n'.join(rows)
  print(text)
  print(
    f'({len(CASES)} samplers x {len(steps)} step counts in {time.time() - start:.0f} s; '
    f'observed order: -slope of log(error) vs log(steps), fitted over the last 3 counts)'
  )
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main(sys.argv)

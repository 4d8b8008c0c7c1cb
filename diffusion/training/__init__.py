"""Training: the train state and step, the task protocol and registry, the per-stage tasks, and the loop
`train_and_evaluate(config, workdir)`."""

from diffusion.training.loop import train_and_evaluate
from diffusion.training.state import TrainState, create_optimizer, create_train_state, make_train_step
from diffusion.training.task import TASKS, Task

__all__ = [
  'TASKS',
  'Task',
  'TrainState',
  'create_optimizer',
  'create_train_state',
  'make_train_step',
  'train_and_evaluate',
]

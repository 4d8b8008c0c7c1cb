r"""Feature-extraction throughput of our FID InceptionV3 against pytorch-fid's, same images, same batch.

  python scripts/bench_fid.py [--batch_size 50] [--batches 4] [--image_size 64]

Both networks get the same random weights (pytorch-fid's architecture built offline, converted with
diffusion.interop.inception.convert_state_dict) and the same uint8 images, including the bilinear resize to 299. Prints
images/s of each and the time ratio ours / pytorch-fid (lower is better; 1.0 = same speed). Needs the test extra
(torch, torchvision, pytorch-fid). Runs on the default JAX backend; PyTorch runs on CPU unless CUDA is available.
"""

import argparse
import os
import time

import numpy as np

from diffusion import results


def _torch_reference(seed: int):
  import torch
  import torchvision
  from pytorch_fid import inception as pf

  torch.manual_seed(seed)
  model = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
  for name, block in [
    ('Mixed_5b', pf.FIDInceptionA(192, 32)),
    ('Mixed_5c', pf.FIDInceptionA(256, 64)),
    ('Mixed_5d', pf.FIDInceptionA(288, 64)),
    ('Mixed_6b', pf.FIDInceptionC(768, 128)),
    ('Mixed_6c', pf.FIDInceptionC(768, 160)),
    ('Mixed_6d', pf.FIDInceptionC(768, 160)),
    ('Mixed_6e', pf.FIDInceptionC(768, 192)),
    ('Mixed_7b', pf.FIDInceptionE_1(1280)),
    ('Mixed_7c', pf.FIDInceptionE_2(2048)),
  ]:
    setattr(model, name, block)
  original = pf.fid_inception_v3
  pf.fid_inception_v3 = lambda: model
  try:
    net = pf.InceptionV3([3]).eval()
  finally:
    pf.fid_inception_v3 = original
  return model, net


def _time_interleaved(fns, batches) -> list[float]:
  """Seconds each function spends on all batches; batches alternate between them, so load drift hits both."""
  for fn in fns:
    fn(batches[0])  # Warm-up: compilation, allocator, threads.
  totals = [0.0] * len(fns)
  for b in batches:
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn(b)
      totals[i] += time.perf_counter() - start
  return totals


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch_size', type=int, default=50)
  parser.add_argument('--batches', type=int, default=4)
  parser.add_argument('--image_size', type=int, default=64, help='input size before the resize to 299')
  parser.add_argument('--record', default=None, help='where the record goes (default docs/results/bench_fid.json)')
  args = parser.parse_args()
  load_at_start = results.load_average()

  import jax
  import torch

  from diffusion.evaluation import inception
  from diffusion.interop.inception import convert_state_dict

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model, net = _torch_reference(0)
  net = net.to(device)
  variables = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()})
  ours = inception.FeatureExtractor(variables)
  rng = np.random.default_rng(0)
  batches = [
    rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3)).astype(np.uint8)
    for _ in range(args.batches)
  ]

  @torch.no_grad()
  def theirs(images):
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255
    return net(x)[0].cpu().numpy()

  n = args.batch_size * args.batches
  t_theirs, t_ours = _time_interleaved([theirs, ours], batches)
  print(
    f'JAX backend: {jax.default_backend()} ({jax.device_count()} device(s)); PyTorch: {device} '
    f'({torch.get_num_threads()} threads); CPU cores: {os.cpu_count()}'
  )
  print(f'batch {args.batch_size}, {args.batches} timed batches, {args.image_size}px uint8 -> 299 bilinear')
  print(f'pytorch-fid InceptionV3: {n / t_theirs:.2f} images/s')
  print(f'ours (JAX/Flax):         {n / t_ours:.2f} images/s')
  print(f'time ratio ours/pytorch-fid: {t_ours / t_theirs:.2f}')
  results.write_record(
    'bench_fid',
    {
      'pytorch_fid_images_per_s': n / t_theirs,
      'ours_images_per_s': n / t_ours,
      'time_ratio_ours_over_pytorch_fid': t_ours / t_theirs,
    },
    path=args.record,
    load_at_start=load_at_start,
    settings=vars(args),
    torch_device=device,
    torch_threads=torch.get_num_threads(),
  )


if __name__ == '__main__':
  main()

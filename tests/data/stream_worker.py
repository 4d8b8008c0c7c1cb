"""One process of the streamed-source tests on several processes (jax.distributed on 127.0.0.1).

  python tests/data/stream_worker.py CONFIG.json OUT.json PROCESS_ID NUM_PROCESSES PORT

CONFIG.json holds a data config. The process reads its share of one epoch (captions in order), and checks resume:
`RESUME_AT` batches of an endless stream, its state through JSON into a fresh pipeline, then the next `RESUME_NEXT`
batches of both; OUT.json gets the captions of each.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

RESUME_AT, RESUME_NEXT, BATCH = 3, 3, 2


def main(config_path: str, out_path: str, process_id: int, num_processes: int, port: int) -> None:
  import jax
  import ml_collections

  from diffusion.data import inputs, tokenizer

  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=num_processes, process_id=process_id)
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tok = tokenizer.build_word_tokenizer([f'item {i}' for i in range(100)], config.max_text_length)
  make = lambda **kw: inputs.create_input_pipeline(
    config,
    'train',
    tokenizer=tok,
    batch_size=BATCH,
    seed=0,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    **kw,
  )
  captions = lambda batch: tok.batch_decode(batch['input_ids'], skip_special_tokens=True)
  epoch = [c for batch in make(num_epochs=1, drop_remainder=False) for c in captions(batch)]
  straight = iter(make())
  [next(straight) for _ in range(RESUME_AT)]
  state = json.loads(json.dumps(straight.get_state()))
  expected = [captions(next(straight)) for _ in range(RESUME_NEXT)]
  resumed = iter(make())
  resumed.set_state(state)
  got = [captions(next(resumed)) for _ in range(RESUME_NEXT)]
  with open(out_path, 'w') as f:
    json.dump({'epoch': epoch, 'expected': expected, 'resumed': got, 'process_index': jax.process_index()}, f)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))

"""Records (diffusion.results): what every record carries, and where records go."""

import json
import os

from diffusion import results


def test_a_record_carries_its_provenance(tmp_path):
  path = results.write_record(
    'bench_x',
    [{'images_per_s': 2.5}],
    path=str(tmp_path / 'x.json'),
    command='python scripts/bench_x.py --fast',
    load_at_start=1.25,
    settings={'batch': 4},
    num_params=7,
  )
  record = json.loads(open(path).read())
  assert record['name'] == 'bench_x' and record['command'] == 'python scripts/bench_x.py --fast'
  assert record['results'] == [{'images_per_s': 2.5}] and record['settings'] == {'batch': 4}
  assert record['num_params'] == 7
  assert record['load_average']['start'] == 1.25 and record['load_average']['end'] >= 0
  assert len(record['git']['commit']) == 40 and isinstance(record['git']['dirty'], bool)
  assert {'python', 'jax', 'flax', 'numpy'} <= set(record['packages'])
  assert record['machine']['device_kind'] and record['machine']['device_count'] >= 1
  assert record['created_utc'].endswith('Z')


def test_record_paths_and_missing_records(tmp_path):
  assert results.record_path('bench_train') == os.path.join(results.RESULTS_DIR, 'bench_train.json')
  assert results.record_path('/tmp/out.json') == '/tmp/out.json'
  assert results.read_record('nothing_here', str(tmp_path)) is None
  assert results.git_state(str(tmp_path))['commit'] == 'unknown'

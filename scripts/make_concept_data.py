r"""Instance images of a concept shape the shapes dataset never draws, for DreamBooth (make demo-lora).

  python scripts/make_concept_data.py --out workdirs/demo/concept [--shape cross] [--num_images 36]
      [--image_size 32] [--seed 2024]

Writes OUT/NNNN.png and OUT/metadata.jsonl ('a red cross', ...: one colour of the palette per image, in turn, at a
position and size drawn as for the base's single objects, from the concept's own generator
`diffusion.data.shapes.concept_scene_for_index`), and OUT/class_prompts.txt: the base dataset's 18 single-object
prompts, which the base model draws for DreamBooth's prior preservation (`--config.dreambooth.class_prompts_file`).
An existing OUT with the same files is rewritten identically.
"""

import json
import os
import sys

from absl import flags

from diffusion import cli
from diffusion.errors import user_errors_exit

_OUT = flags.DEFINE_string('out', None, 'Folder to write.')
_SHAPE = flags.DEFINE_string('shape', 'cross', 'The concept shape.')
_NUM = flags.DEFINE_integer('num_images', 36, 'Instance images (the colours in turn).')
_SIZE = flags.DEFINE_integer('image_size', 32, 'Image side in pixels.')
_SEED = flags.DEFINE_integer('seed', 2024, "The concept generator's stream.")


@user_errors_exit
def main(argv: list[str]) -> None:
  cli.parse_flags(argv, config_flag=None, required=('out',), doc=__doc__)
  from diffusion.data import oracle, shapes
  from diffusion.images import save_png

  cli.require(_SHAPE.value in shapes.CONCEPT_SHAPES, f'--shape {_SHAPE.value!r}: known {shapes.CONCEPT_SHAPES}')
  cli.require(_NUM.value >= 1 and _SIZE.value >= 8, '--num_images must be >= 1 and --image_size >= 8')
  os.makedirs(_OUT.value, exist_ok=True)
  rows = []
  for i in range(_NUM.value):
    scene = shapes.concept_scene_for_index(_SHAPE.value, _SEED.value, i)
    colour = shapes.COLOURS[i % len(shapes.COLOURS)]  # Every colour equally often.
    obj = scene.objects[0]
    scene = shapes.Scene(objects=(shapes.SceneObject(colour, obj.shape, obj.cx, obj.cy, obj.r),), caption='')
    caption = shapes.object_phrase(colour, _SHAPE.value)
    name = f'{i:04d}.png'
    save_png(shapes.render_scene(scene, _SIZE.value), os.path.join(_OUT.value, name))
    rows.append({'file_name': name, 'text': caption})
  with open(os.path.join(_OUT.value, 'metadata.jsonl'), 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  with open(os.path.join(_OUT.value, 'class_prompts.txt'), 'w') as f:
    f.writelines(p + '\n' for p in oracle.single_object_prompts())
  print(f'wrote {len(rows)} images of a {_SHAPE.value} and class_prompts.txt to {_OUT.value}', flush=True)


if __name__ == '__main__':
  main(sys.argv)

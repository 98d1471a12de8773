"""A MONAI Bundle's words: docs/README.md (what the model segments, how it was trained and validated, how to run
it, its limits) and the LICENSE the user chooses (see nerveseg/export/bundle.py for the rest of the bundle)."""

import datetime
from pathlib import Path

from nerveseg.errors import UserError
from nerveseg.model import network_of

LICENSES = ("", "MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "CC0-1.0", "CC-BY-4.0", "CC-BY-SA-4.0",
            "CC-BY-NC-4.0", "CC-BY-NC-SA-4.0", "CC-BY-NC-ND-4.0", "GPL-3.0-only", "GPL-3.0-or-later",
            "LGPL-3.0-only", "AGPL-3.0-only", "MPL-2.0", "EPL-2.0", "Unlicense")  # export.py --license: SPDX
# identifiers ("": to fill in later); any other licence is given as a file


def bundle_readme(metadata: dict, *, target: str, license_note: str) -> str:
    """docs/README.md: what the bundle segments, how it was trained and validated, how to run it, its limits."""
    record, formats = metadata["nerveseg"], metadata["network_data_format"]
    height, width = formats["inputs"]["image"]["spatial_shape"]
    settings = record.get("settings") or {}
    rows = [f"| {key.replace('_', ' ')} | {value:.4f} |" if isinstance(value, float) else
            f"| {key.replace('_', ' ')} | {value} |" for key, value in metadata["eval_metrics"].items()]
    figures = "| figure | value |\n|---|---|\n" + "\n".join(rows) if rows else "(The checkpoint holds no figures.)"
    epochs = f", {settings['max_epochs']} epochs" if settings.get("max_epochs") else ""
    ensemble = "cross_validated_kaggle_dice_mean" in metadata["eval_metrics"]
    validated = ("Each fold model validated on its own fifth of the training subjects (whole subjects, never single "
                 "frames); the figures are the post-processed Kaggle Dice over the folds" if ensemble else
                 "On the validation subjects held out of training (whole subjects, never single frames)")
    packages = " ".join(metadata["required_packages_version"])
    return f"""# {metadata['task']}

{metadata['description']}

## What it segments

Input: 2-D ultrasound images of any size, in any format PIL reads (PNG, JPEG, TIFF, BMP; colour and 16-bit
images are converted to 8-bit grayscale). Output: one mask per image, a PNG of 0 and 255 at the image's own
size: 255 where the model finds the {target}. {metadata['presence_rule'].capitalize()}.

## How it was trained

- Data: {metadata['data_source']}.
- Network: {metadata['description'].split(', predicting with')[0]}; input {height}x{width} (area-resized,
  8-bit / 255){epochs}.
- Predicting with: {record['predicting_with']}.
- Post-processing (chosen on the validation images): {metadata['postprocessing']}.

## How it was validated

{validated}. Kaggle mean Dice: an empty truth scores 1 when the mask is empty too, else 0; the all-empty
baseline is the score of predicting every mask empty.

{figures}

## How to run it

```bash
pip install torch monai=={metadata['monai_version']} {packages}
python -m monai.bundle run --config_file {{bundle}}/configs/inference.json \\
    --dataset_dir {{images}} --output_dir {{masks}}
```

It reads every image below `--dataset_dir` (subfolders too; files named `<name>_mask.*` are taken as truth
masks and skipped) and writes `<output_dir>/<its path below dataset_dir>.png`. On the CPU these are the masks
that the exporting project's `predict.py` writes for the same checkpoint, pixel for pixel. Settings can be
changed on the command line: `--threshold 0.6`, `--presence_threshold 0`, `--min_area_fraction 0`,
`--batch_size 8`, `--device "\\$torch.device('cpu')"`. Where the config is not run with `monai.bundle run`
(MONAI Label, your own ConfigParser), set `bundle_root` to this folder.

Check the network against the metadata: `python -m monai.bundle verify_net_in_out network_def --meta_file
{{bundle}}/configs/metadata.json --config_file {{bundle}}/configs/inference.json --bundle_root {{bundle}}`.

## Files

- `configs/inference.json`: reading, preprocessing, the network, the presence rule and post-processing, writing.
- `configs/metadata.json`: the bundle specification's metadata; under `nerveseg`, the full record of the model
  (configuration, preprocessing, post-processing, test-time augmentation, settings, validation figures).
- `models/model.ts`: the network traced to TorchScript: images (N, 1, {height}, {width}) in [0, 1] to (N, 2,
  {height}, {width}): the {target}'s probability per pixel, and the image's presence probability at every pixel.
- `models/model.pt`: its weights (a state dict: {network_of(record['model_config']).weights};
  an ensemble's are `members.<k>.*`).

## Limits

- Research and demonstration only: not a medical device, not for diagnosis.
- It knows only images like those it was trained on (the data above); expect it to fail on other probes,
  body parts or settings.
- An unreadable image stops the run (predict.py skips it and names it).
- On a GPU, the masks may differ from the CPU's by a few pixels where a probability lies at the threshold.
- Two images whose names differ only by their extension (`a.png`, `a.tif`) are written to the same mask.

## Licence

{license_note}
"""


def license_text(choice: str, *, authors: str) -> tuple[str, str]:
    """The LICENSE file and a line for the README: "" asks the user to fill it in; an existing file is copied;
    anything else is one of the SPDX licence identifiers of LICENSES (export.py's parser checks it)."""
    if not choice:
        text = ("No licence has been chosen for this model yet. Replace this file with the licence you share it\n"
                "under (export.py --license MIT, --license Apache-2.0, ... or --license path/to/LICENSE).\n\n"
                "The training data's terms may restrict what the model may be used for: check them first\n"
                "(the Kaggle competition's data, for one, is not openly licensed).\n")
        return text, "Not chosen yet: see `LICENSE`, and the training data's terms."
    path = Path(choice)
    if path.is_file():
        try:
            return path.read_text(), f"See `LICENSE` (copied from {path.name})."
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--license {choice}: cannot read it as text ({error}); pass a text file or an SPDX "
                            "identifier such as MIT") from None
    year = datetime.date.today().year
    text = (f"SPDX-License-Identifier: {choice}\n\nCopyright (c) {year} {authors or 'the authors'}\n\n"
            f"This model is licensed under {choice}: https://spdx.org/licenses/{choice}.html\n")
    return text, f"{choice} (see `LICENSE`)."

"""MindSpore Lite converter script, config and deployment notes written next to an exported .mindir.

The converter (`converter_lite`) and the phone-side `benchmark` are not installable in this environment, so the
export cannot produce the `.ms` files itself; it writes exactly what to run instead:

    <stem>.converter.sh   two converter_lite commands: Arm CPU (dynamic shapes) and Kirin NPU (static shapes)
    <stem>.lite.cfg       converter config: ARM64 SDOT kernels, optionally dynamic int8 quantization
    <stem>.DEPLOY.md      how to run the converter and the on-device benchmark

Only flags and config keys documented for converter_lite / benchmark are used (docs/mindspore.md 4.7 and 4.8):
`--fmk --modelFile --outputFile --optimize --inputShape --configFile`, `[cpu_option_cfg_param]`,
`[common_quant_param]`, `benchmark --device --modelFile`.

Why two conversions: the Kirin NPU (HiAI) compiles a fixed graph, so its model must have every input shape fixed
with `--inputShape` (which removes the dynamic dimensions); the Arm CPU runtime handles dynamic batch and length,
so its model keeps them and only pads each batch to its own longest row.
"""
from __future__ import annotations

import shlex
import stat
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple, Union

from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.export import ExportError

LITE_QUANT_CHOICES = ("none", "dynamic8")
DEFAULT_NPU_SHAPE = (1, 128)


@dataclass
class LiteFiles:
    converter_script: Path
    config: Path
    deploy_notes: Path
    cpu_model: str  # the .ms names the script will produce, relative to the script's directory
    npu_model: str


def converter_config(quant: str = "none") -> str:
    """The `--configFile` INI for the Arm CPU model.

    ARM64 + SIMD_DOT selects the SDOT MatMul kernels (ARMv8.2 dot product, present on Kirin 980 and later), which
    speed up fp32 and dynamic-quant MatMul-heavy models such as BERT. `dynamic8` adds DYNAMIC_QUANT (int8 weights,
    activations quantized at run time): the documented choice for NLP models, no calibration data needed.
    """
    if quant not in LITE_QUANT_CHOICES:
        raise ExportError(f"lite quantization {quant!r}: expected one of {LITE_QUANT_CHOICES}")
    lines = ["[cpu_option_cfg_param]", "architecture=ARM64", "instruction=SIMD_DOT"]
    if quant == "dynamic8":
        lines += ["", "[common_quant_param]", "quant_type=DYNAMIC_QUANT", "bit_num=8"]
    return "\n".join(lines) + "\n"


def static_input_shape(input_names: Sequence[str], shape: Tuple[int, int]) -> str:
    """`--inputShape` value fixing every input to (batch, length): `name:1,128;name:1,128;...`.

    MindIR input names carry a graph prefix with a colon (`..._construct_80:input_ids`); the converter splits each
    entry on its last colon, so such names are passed whole.
    """
    if len(shape) != 2 or any(int(size) < 1 for size in shape):
        raise ExportError(f"static input shape {tuple(shape)}: expected (batch, length), both >= 1")
    dims = f"{int(shape[0])},{int(shape[1])}"
    return ";".join(f"{name}:{dims}" for name in input_names)


def converter_commands(model_file: str, input_names: Sequence[str], npu_shape: Tuple[int, int] = DEFAULT_NPU_SHAPE,
                       config_file: str = "model.lite.cfg") -> Tuple[str, str, str, str]:
    """(cpu command, npu command, cpu .ms name, npu .ms name); file names relative to the .mindir's directory."""
    stem = model_file[: -len(".mindir")] if model_file.endswith(".mindir") else model_file
    cpu_output, npu_output = f"{stem}_cpu", f"{stem}_npu"
    common = ["converter_lite", "--fmk=MINDIR", f"--modelFile={model_file}"]
    cpu = common + [f"--outputFile={cpu_output}", "--optimize=general", f"--configFile={config_file}"]
    npu = common + [f"--outputFile={npu_output}", "--optimize=general",
                    f"--inputShape={static_input_shape(input_names, npu_shape)}"]
    return (" ".join(shlex.quote(part) for part in cpu), " ".join(shlex.quote(part) for part in npu),
            cpu_output + ".ms", npu_output + ".ms")


def _converter_script(model_file: str, cpu_command: str, npu_command: str, quant: str,
                      npu_shape: Tuple[int, int]) -> str:
    quant_note = ("int8 dynamic quantization (DYNAMIC_QUANT, bit_num=8)" if quant == "dynamic8"
                  else "fp32 weights\n# (re-export with --lite-quant dynamic8 for int8 dynamic quantization)")
    return f"""#!/usr/bin/env bash
# Converts {model_file} into MindSpore Lite .ms models. Written by `msnc export`; see the DEPLOY.md next to it.
# Needs converter_lite from the MindSpore Lite Linux x86_64 package on PATH (with its lib directory on
# LD_LIBRARY_PATH); it runs on the build machine, not on the phone.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v converter_lite >/dev/null 2>&1; then
    echo "converter_lite not found on PATH: install the MindSpore Lite Linux x86_64 package (see DEPLOY.md)" >&2
    exit 1
fi

# Arm CPU: dynamic batch and sequence length kept; ARM64 SDOT kernels; {quant_note}.
{cpu_command}

# Kirin NPU: the NPU needs static shapes, so every input is fixed to batch {npu_shape[0]}, length {npu_shape[1]}
# (pad shorter inputs, truncate longer ones). Ops the NPU lacks fall back to the CPU at run time.
{npu_command}
"""


def _deploy_notes(model_file: str, config_file: str, script_file: str, cpu_model: str, npu_model: str,
                  input_names: Sequence[str], npu_shape: Tuple[int, int], quant: str, notes: Sequence[str]) -> str:
    measured = "\n".join(f"- {line}" for line in notes) if notes else "- (nothing recorded)"
    names = "\n".join(f"  - `{name}`" for name in input_names)
    if quant == "dynamic8":
        quant_text = ("The CPU model uses DYNAMIC_QUANT with bit_num=8: int8 weights, activations quantized at run "
                      "time (accelerated with SDOT on ARM). Do not add `--fp16=on`: dynamic quantization cannot be "
                      "combined with fp16.")
    else:
        quant_text = ("The CPU model keeps fp32 weights. For int8 weights with run-time activation quantization (the "
                      "documented choice for NLP models), re-export with `--lite-quant dynamic8`.")
    quant_text = textwrap.fill(quant_text, width=115)
    return f"""# Deploying {model_file} with MindSpore Lite (Arm CPU / Kirin NPU)

Written by `msnc export`, which measured (the reload check runs the `.mindir` through `ms.load` + `nn.GraphCell`
and compares it with the MindSpore Cell):

{measured}

## Inputs and output

Three int32 inputs of shape (batch, length), in this order (names as stored in the MindIR file):
{names}

They are `input_ids`, `attention_mask` (1 real token, 0 padding) and `token_type_ids` (0 first segment, 1 second).
The converter script passes these names whole to `--inputShape` (it splits each entry on its last colon). The
converter was not available where this file was written: if it reports an unknown input name, use the names it
lists for the model.
Tokenize with the vocabulary the model was exported with (vocab.txt of the model directory).

## 1. Convert (on an x86_64 Linux build machine)

Install the MindSpore Lite Linux x86_64 package, put its `converter_lite` on PATH, then:

    bash {script_file}

This writes:
- `{cpu_model}` for the Arm CPU: dynamic batch and length, `{config_file}` selects the ARM64 SDOT kernels
  (`[cpu_option_cfg_param] architecture=ARM64 instruction=SIMD_DOT`).
- `{npu_model}` for the Kirin NPU: static shapes (batch {npu_shape[0]}, length {npu_shape[1]}) fixed with
  `--inputShape`, because the NPU compiles a fixed graph and cannot take dynamic shapes. Pad every request to
  length {npu_shape[1]}; to change the shape, re-run `msnc export` with `--npu-shape BATCH,LENGTH` or edit the
  script.

{quant_text}

`--optimize=general` (the converter's default) targets the device-side CPU/GPU runtimes, not Ascend; `.ms` is the
device-side format, and the Kirin NPU runs it through the NPU device configured in the Lite context.

## 2. Benchmark on the phone

Arm CPU: the downloadable `mindspore-lite-*-android-aarch64` package is enough. Push the model, the `benchmark`
binary and the package's libraries to the phone (e.g. `adb push` to `/data/local/tmp`), then run there:

    ./benchmark --device=CPU --modelFile={cpu_model}

Kirin NPU: build Lite yourself with `MSLITE_ENABLE_NPU=ON bash build.sh -I arm64` against HiAI DDK
100.510.010.010, ship the DDK's `libhiai*.so` with the libraries, then:

    ./benchmark --device=NPU --modelFile={npu_model}

Ops the NPU does not support (see the Lite operator list) fall back to the CPU; check the benchmark log for
fallbacks before trusting NPU timings.

## Checks before shipping

- Compare the `.ms` outputs with the MindSpore Cell on a few real sentences: Lite conversion has been reported to
  lose accuracy offline (mindspore-lab/mindocr#696), and the reload check above only covers the `.mindir`.
- Lite 2.10 no longer supports model encryption or obfuscation.
"""


def write_lite_files(mindir_file: Union[str, Path], input_names: Sequence[str], quant: str = "none",
                     npu_shape: Tuple[int, int] = DEFAULT_NPU_SHAPE, notes: Sequence[str] = ()) -> LiteFiles:
    """Write `<stem>.converter.sh` (executable), `<stem>.lite.cfg` and `<stem>.DEPLOY.md` next to `mindir_file`.

    `input_names` are the MindIR graph input names (`mindir.mindir_input_names`); `notes` are measured lines
    (sizes, reload differences) copied into DEPLOY.md. Files are overwritten; the script refers to its neighbours
    by name, so the directory can be copied elsewhere as a whole.
    """
    mindir_file = Path(mindir_file)
    if mindir_file.suffix != ".mindir":
        raise ExportError(f"{mindir_file}: expected a .mindir file")
    if not input_names:
        raise ExportError(f"{mindir_file}: no graph input names given")
    stem = mindir_file.name[: -len(".mindir")]
    directory = mindir_file.parent
    config_path = directory / f"{stem}.lite.cfg"
    script_path = directory / f"{stem}.converter.sh"
    notes_path = directory / f"{stem}.DEPLOY.md"
    config_text = converter_config(quant)
    cpu_command, npu_command, cpu_model, npu_model = converter_commands(mindir_file.name, input_names, npu_shape,
                                                                        config_path.name)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_path, config_text)
    write_text_atomic(script_path, _converter_script(mindir_file.name, cpu_command, npu_command, quant, npu_shape),
                      mode=stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    write_text_atomic(notes_path, _deploy_notes(mindir_file.name, config_path.name, script_path.name, cpu_model,
                                                npu_model, input_names, npu_shape, quant, notes))
    return LiteFiles(script_path, config_path, notes_path, cpu_model, npu_model)

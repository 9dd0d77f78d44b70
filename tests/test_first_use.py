"""A new user's first steps, as written: the README's conversion command and the workflows' notes, run in a
ComfyUI-shaped folder with the pack where a clone puts it; files land where Load SAE looks, readable by others."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch
from sae_builders import random_weights, write_sparsify

from sae_core.concepts import ConceptDictionary
from sae_core.formats import load_sae, save_native

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACK = "sae-concept-eraser"  # the folder name of the README's `git clone ... ComfyUI/custom_nodes/sae-concept-eraser`


@pytest.fixture
def comfy(tmp_path):
    """ComfyUI/ with custom_nodes/sae-concept-eraser (this repository) and an empty models/ folder."""
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    return root


def readme_convert_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"`(python custom_nodes/sae-concept-eraser convert [^`]+)`", text)
    assert m, "README: the conversion command is missing from 'Where files go'"
    return m.group(1)


def run_in(cwd: pathlib.Path, command: str) -> subprocess.CompletedProcess:
    """``command`` as typed in a shell in ``cwd`` ('python' = the Python that runs ComfyUI), with umask 022
    and no PYTHONPATH: nothing but the command line itself finds the pack."""
    argv = shlex.split(command)
    assert argv[0] == "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def umask():
        os.umask(0o022)

    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=umask)


def test_readme_conversion_runs_from_the_comfyui_folder(comfy, tmp_path):
    src = write_sparsify(tmp_path / "downloads" / "unet.up_blocks.1.attentions.1", random_weights(1280, 64), k=4,
                         saeuron=True)
    cmd = readme_convert_command().replace("<checkpoint dir>", str(src)).replace("<name>", "saeuron_up11")
    done = run_in(comfy, cmd)
    assert done.returncode == 0, done.stderr
    out = comfy / "models" / "sae" / "saeuron_up11.safetensors"  # Load SAE's folder: ComfyUI/models/sae
    assert out.is_file() and oct(out.stat().st_mode & 0o777) == "0o644"
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left behind
    a, b = load_sae(out), load_sae(src)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name))  # bit-identical to reading the folder itself
    assert not (ROOT / "models").exists()  # nothing written into the pack


def test_every_workflow_note_command_puts_the_file_where_load_sae_looks(comfy, tmp_path):
    src = write_sparsify(tmp_path / "dl" / "ckpt", random_weights(1280, 64), k=4, saeuron=True)
    seen, ran = 0, set()
    for wf_path in sorted((ROOT / "example_workflows").glob("*.json")):
        wf = json.loads(wf_path.read_text())
        selected = {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "SAELoad"}
        for note in (n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")):
            for cmd in re.findall(r"`(python [^`]*convert [^`]+)`", note["widgets_values"][0]):
                cmd = cmd.replace("<that folder>", str(src))
                if cmd not in ran:  # several workflows use the same SAE: once is enough (a second refuses)
                    done = run_in(comfy, cmd)
                    assert done.returncode == 0, (wf_path.name, cmd, done.stderr)
                    ran.add(cmd)
                dst = pathlib.Path(shlex.split(cmd)[-1])
                assert not dst.is_absolute() and dst.parts[:2] == ("models", "sae"), (wf_path.name, cmd)
                assert dst.name in selected, (wf_path.name, dst.name, selected)  # the file the graph's Load SAE picks
                assert (comfy / dst).is_file()
                seen += 1
    assert seen >= 3


def test_saved_files_respect_the_umask(tmp_path):
    sae = load_sae(write_sparsify(tmp_path / "c", random_weights(16, 64), k=4, saeuron=True))
    old = os.umask(0o027)
    try:
        save_native(sae, tmp_path / "a.safetensors")
        ConceptDictionary.from_latents([1, 2], 64, threshold=0.0, name="x", sae_fingerprint=sae.fingerprint()).save(
            tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "c.safetensors"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == "0o640", name
    save_native(sae, tmp_path / "b.safetensors")
    assert oct((tmp_path / "b.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~old)

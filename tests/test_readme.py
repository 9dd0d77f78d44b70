"""Every ```python snippet of README.md runs as written.

Each snippet runs in a fresh folder (its own globals) holding tiny stand-ins of the files it names, listed in
FILES below; a snippet that names a file nobody prepared fails, so the list has to follow the README.
"""

import re
from pathlib import Path

import pytest
from sae_builders import random_weights, write_sparsify

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[str]:
    return SNIPPET.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def _saeuron_objects_block(where: Path) -> None:
    # SAeUron's layout and config at its real width (1280), with 2560 latents instead of 20480 to stay fast
    write_sparsify(where / "sae-ckpts" / "unet.up_blocks.1.attentions.1", random_weights(1280, 2560), k=32, saeuron=True)


# a path a snippet reads -> what writes a stand-in for it
FILES = {"sae-ckpts/unet.up_blocks.1.attentions.1": _saeuron_objects_block}


def test_the_readme_has_snippets():
    assert len(snippets()) >= 2  # the checkpoint snippet and the diffusers one


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch, one_thread):
    code = snippets()[index]
    if re.search(r"^\s*(from|import) diffusers\b", code, re.M):
        pytest.importorskip("diffusers")
    for name, write in FILES.items():
        if f'"{name}"' in code:
            write(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_snippet_{index}"}
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), namespace)
    # what the snippets promise in their comments
    if "save_native(" in code:
        assert (tmp_path / "models" / "sae" / "saeuron_up11.safetensors").is_file()
        assert namespace["codes"].shape == (2, 16, 16, 2560) and namespace["x_hat"].shape == namespace["x"].shape
        assert int((namespace["codes"] != 0).sum(-1).max()) <= 32
    if "recorder.masks" in code:
        steps, masks = namespace["steps"], namespace["masks"]
        assert steps == [0, 1, 2] and tuple(masks.shape) == (3, 8, 12)

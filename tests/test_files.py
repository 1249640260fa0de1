"""Files we write: the same content gives the same bytes, in every process."""
import hashlib
import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from dsutil.files import load_tensors

WRITE = """
import sys, torch
from dsutil.files import save_tensors
save_tensors(sys.argv[1], {"images": torch.arange(12.0).view(3, 4), "labels": torch.tensor([2, 0, 1])},
             {"classes": ["b", "a", "c"], "method": "lpld", "ipc": 1, "settings": {"lr": 0.25, "flip": True}})
"""


def test_same_tensors_and_metadata_give_the_same_bytes_in_other_processes(tmp_path):
    digests = set()
    for i, hash_seed in enumerate(["1", "2", "3"]):  # safetensors' own metadata map comes out in random order
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True, env={"PYTHONHASHSEED": hash_seed})
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    tensors, meta = load_tensors(path)
    assert meta == {"classes": ["b", "a", "c"], "ipc": 1, "method": "lpld", "settings": {"flip": True, "lr": 0.25}}
    assert tensors["labels"].tolist() == [2, 0, 1]


def test_files_with_one_header_entry_per_key_still_load(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({"x": torch.ones(2)}, str(path), metadata={"classes": json.dumps(["a"]), "ipc": "3"})
    assert load_tensors(path)[1] == {"classes": ["a"], "ipc": 3}

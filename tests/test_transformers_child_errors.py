"""How a failed export child reaches the caller (fast: the child here is a small Python process, not a checkpoint
export): its ModelpressError comes back with its class and message; anything else as an InvalidModelError that
names the folder and the exit status and carries the tail of what the child printed."""

from __future__ import annotations

import json
import sys

import pytest

from modelpress.adapters import transformers_child as child
from modelpress.plugin_api import InvalidModelError, OptionsError


def test_a_crashed_child_is_an_invalid_model_error_with_its_last_lines(tmp_path):
    script = "import sys\nprint('loading shards')\nprint('SafetensorError: incomplete metadata', file=sys.stderr)\nsys.exit(3)\n"
    code = child._run([sys.executable, "-c", script], tmp_path / "child.log")
    assert code == 3
    with pytest.raises(InvalidModelError) as info:
        child._raise_failure(tmp_path, code, tmp_path / "ckpt")
    message = str(info.value)
    assert "ckpt" in message and "exit status 3" in message
    assert "SafetensorError: incomplete metadata" in message and "loading shards" in message


def test_a_modelpress_error_in_the_child_keeps_its_class_and_message(tmp_path):
    (tmp_path / "error.json").write_text(
        json.dumps({"type": "OptionsError", "message": "task 'x': can do y"})
    )
    with pytest.raises(OptionsError, match="task 'x': can do y"):
        child._raise_failure(tmp_path, 1, tmp_path / "ckpt")

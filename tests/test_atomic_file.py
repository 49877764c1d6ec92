"""A file written atomically is either the old one or the whole new one."""

import os

import pytest

from paddlerec_milvus.atomic_file import write_atomically


def test_replaces_whole_and_a_failed_write_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "best.json")
    write_atomically(path, lambda f: f.write('{"epoch": 1}'))
    assert open(path).read() == '{"epoch": 1}'

    def half(f):
        f.write('{"epo')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, half)
    assert open(path).read() == '{"epoch": 1}'
    assert os.listdir(tmp_path) == ["best.json"]  # no temporary file left behind
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"

"""User taxonomy files of the wrong encoding or with wrongly typed entries give a ConfigError naming the file."""

import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.interpret.taxonomy import load_taxonomy


def test_non_utf8_taxonomy_file_is_a_config_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_bytes("entries:\n  - id: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"Taxonomy file .*mine\.yaml is not UTF-8 text.*save it as UTF-8"):
        load_taxonomy(path)


@pytest.mark.parametrize("keywords", ["5", "{x: 1}"])
def test_keywords_must_be_a_list_or_a_string(tmp_path, keywords):
    path = tmp_path / "mine.yaml"
    path.write_text(f"entries:\n  - id: biology\n    keywords: {keywords}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: entry 'biology' has keywords .*give a list of words"):
        load_taxonomy(path)


def test_keywords_as_a_list_or_a_string(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("entries:\n  - id: a\n    keywords: [cells, genes]\n  - id: b\n    keywords: law courts\n")
    assert [e.keywords for e in load_taxonomy(path).entries] == [("cells", "genes"), ("law", "courts")]

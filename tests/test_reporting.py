"""Benchmark scripts write their tables into marked sections of the docs."""
from arvideo.reporting import write_marked_section


def test_marked_section_is_replaced_in_place_and_appended_when_missing(tmp_path):
    doc = tmp_path / "d.md"
    write_marked_section(doc, "<!-- a -->", "<!-- /a -->", "one", header="# T\n")
    assert doc.read_text() == "# T\n\n<!-- a -->\none\n<!-- /a -->\n"
    doc.write_text(doc.read_text() + "tail\n")
    write_marked_section(doc, "<!-- a -->", "<!-- /a -->", "two\\1 $x")  # no regex escapes in the text
    assert doc.read_text() == "# T\n\n<!-- a -->\ntwo\\1 $x\n<!-- /a -->\ntail\n"
    write_marked_section(doc, "<!-- b -->", "<!-- /b -->", "three")
    assert doc.read_text().endswith("tail\n\n<!-- b -->\nthree\n<!-- /b -->\n")


def test_measured_line_names_the_time_and_the_machine():
    import re

    from arvideo.reporting import device_line, measured_line

    line = measured_line()
    assert re.fullmatch(r"Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+", line)
    assert line.endswith(" on " + device_line())

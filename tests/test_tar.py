"""The loader's tar reader against Python's tarfile + webdataset, which it replaces on the hot path."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from clip_pipe.data.tar import TarError, tar_samples

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def write_tar(path, members, tar_format=tarfile.PAX_FORMAT, compress=False):
    """members: (name, bytes) for files, (name, None) for directories, (name, "->target") for symlinks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def webdataset_samples(path):
    samples = wds.tariterators.tarfile_samples([{"url": str(path)}])
    return [s for s in samples if s]


MIXED = [
    ("000.jpg", b"\xff\xd8 image bytes"),
    ("000.txt", b"a caption"),
    ("000.JSON", b"{}"),  # extensions are lower-cased
    ("__meta__", b"webdataset metadata, skipped"),
    ("sub/", None),
    ("sub/001.jpg", b"x" * 512),  # exactly one block
    ("sub/001.txt", b""),  # empty member
    ("sub/001.link", "->000.jpg"),  # symlinks are not samples' data
    ("d" * 90 + "/" + "e" * 80 + "/002.jpg", b"y" * 513),  # over 100 characters: prefix / longname / pax
    (
        "d" * 90 + "/" + "e" * 80 + "/002.tar.gz",
        b"z" * 1000,
    ),  # the extension is everything after the first dot
    ("caf\u00e9-\u65e5\u672c/003.txt", b"non-ASCII names"),
    ("003.cls", b"7"),
    ("noext", b"a member without an extension: no sample key, skipped"),
]


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("tar_format", FORMATS.values(), ids=FORMATS.keys())
def test_reads_every_format_as_tarfile_and_webdataset_do(tmp_path, tar_format, compress):
    path = write_tar(tmp_path / "shard.tar", MIXED, tar_format, compress)
    ours = list(tar_samples(str(path)))
    assert ours == webdataset_samples(path)
    assert [s["__key__"] for s in ours] == [
        "000", "sub/001", "d" * 90 + "/" + "e" * 80 + "/002", "caf\u00e9-\u65e5\u672c/003", "003"
    ]  # fmt: skip
    assert ours[0] == {"__key__": "000", "__url__": str(path), "jpg": b"\xff\xd8 image bytes",
                       "txt": b"a caption", "json": b"{}"}  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    samples=st.lists(
        st.tuples(
            st.text(st.characters(codec="utf-8", exclude_characters="/.\0"), min_size=1, max_size=120),
            st.dictionaries(
                st.sampled_from(["jpg", "png", "txt", "json", "cls", "ids.npy"]),
                st.binary(max_size=1100),
                min_size=1,
            ),
        ),
        max_size=6,
        unique_by=lambda s: s[0],
    ),
    tar_format=st.sampled_from(list(FORMATS.values())),
)
def test_matches_webdataset_on_random_archives(tmp_path_factory, samples, tar_format):
    if tar_format == tarfile.USTAR_FORMAT:  # ustar can store neither long nor non-ASCII names
        samples = [(key, files) for key, files in samples if key.isascii() and len(key) < 90]
    members = [(f"{key}.{ext}", data) for key, files in samples for ext, data in files.items()]
    path = write_tar(tmp_path_factory.mktemp("tar") / "shard.tar", members, tar_format)
    assert list(tar_samples(str(path))) == webdataset_samples(path)


def test_a_truncated_tar_yields_its_whole_samples_then_says_where_it_stopped(tmp_path, caplog):
    members = [(f"{i:03d}.{ext}", bytes([i]) * (300 + 7 * i)) for i in range(8) for ext in ("jpg", "txt")]
    path = write_tar(tmp_path / "whole.tar", members)
    whole, expected = path.read_bytes(), list(tar_samples(str(path)))
    with tarfile.open(path) as tar:  # where each sample's last member ends
        sample_ends = [m.offset_data + m.size for m in tar.getmembers() if m.name.endswith(".txt")]
    for cut in range(0, len(whole), 97):
        path.write_bytes(whole[:cut])
        got = []
        caplog.clear()
        try:
            for sample in tar_samples(str(path)):
                got.append(sample)
        except TarError as e:  # cut inside a header or a member's data
            assert cut < sample_ends[-1] and ("truncated" in str(e) or cut == 0), f"cut at {cut}: {e}"
        else:  # cut between members, or in padding: what is there is read, with a warning
            assert cut >= sample_ends[-1] or "without the end-of-archive marker" in caplog.text, cut
        # Samples as in the whole tar, in order; at a cut between members, the last may lack members
        # (its decoding then fails, and it is counted as skipped).
        assert got[:-1] == expected[: max(len(got) - 1, 0)], f"cut at {cut}: not a prefix"
        assert not got or got[-1].items() <= expected[len(got) - 1].items(), f"cut at {cut}"
        # Only the sample open at the cut is lost: one whose members all came before it may be too,
        # as its end is only known from the next header.
        assert len(got) >= sum(end <= cut for end in sample_ends) - 1, f"cut at {cut}"


def test_a_corrupt_header_is_reported_after_the_samples_before_it(tmp_path):
    members = [(f"{i:03d}.txt", b"caption %d" % i) for i in range(5)]
    data = bytearray(write_tar(tmp_path / "shard.tar", members, tarfile.USTAR_FORMAT).read_bytes())
    data[3 * 1024 + 10] ^= 0xFF  # inside the fourth member's name: its checksum no longer holds
    (tmp_path / "shard.tar").write_bytes(bytes(data))
    got = []
    with pytest.raises(TarError, match="bad header checksum at byte 3072"):
        for sample in tar_samples(str(tmp_path / "shard.tar")):
            got.append(sample["__key__"])
    assert got == ["000", "001"]  # 002 was still open when the stream broke


def test_an_absurd_member_size_is_refused_without_reading_it(tmp_path):
    info = tarfile.TarInfo("000.jpg")
    info.size = 2**40  # a terabyte, in a header whose checksum is right
    header = info.tobuf(tarfile.GNU_FORMAT)
    (tmp_path / "shard.tar").write_bytes(header + bytes(1024))
    with pytest.raises(TarError, match="claims 1099511627776 bytes"):
        list(tar_samples(str(tmp_path / "shard.tar")))


def test_a_file_that_is_not_a_tar_is_an_error_not_an_empty_shard(tmp_path):
    (tmp_path / "shard.tar").write_bytes(b"<html>not found</html>" * 50)
    with pytest.raises(TarError, match="bad header checksum at byte 0"):
        list(tar_samples(str(tmp_path / "shard.tar")))


def test_a_cut_or_corrupt_gzip_stream_is_a_tar_error(tmp_path):
    members = [(f"{i:03d}.txt", bytes(range(256)) * 40) for i in range(6)]
    data = write_tar(tmp_path / "shard.tar.gz", members, compress=True).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TarError, match="unreadable gzip stream"):
        list(tar_samples(str(tmp_path / "cut.tar.gz")))
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (tmp_path / "corrupt.tar.gz").write_bytes(bytes(corrupt))
    with pytest.raises(TarError):
        list(tar_samples(str(tmp_path / "corrupt.tar.gz")))


def test_a_malformed_pax_header_is_a_tar_error(tmp_path):
    good = tarfile.TarInfo("000.txt")
    good.size = 3
    info = tarfile.TarInfo("001.txt")
    info.pax_headers = {"size": "12x"}  # not a number
    data = good.tobuf(tarfile.PAX_FORMAT) + b"abc".ljust(512, b"\0") + info.tobuf(tarfile.PAX_FORMAT)
    (tmp_path / "shard.tar").write_bytes(data + bytes(1024))
    with pytest.raises(TarError, match="unreadable pax size '12x'"):
        list(tar_samples(str(tmp_path / "shard.tar")))


def test_a_duplicate_member_keeps_the_first_and_says_so(tmp_path, caplog):
    members = [
        ("000.jpg", b"first"),
        ("000.txt", b"a caption"),
        ("000.jpg", b"second"),  # the same member again, in the same sample
        ("000.JPG", b"third"),  # extensions are lower-cased: the same member once more
        ("001.jpg", b"next"),
        ("000.txt", b"again"),  # a key seen before, but not next to its sample: a new sample, as webdataset
    ]
    path = write_tar(tmp_path / "shard.tar", members)
    assert list(tar_samples(str(path))) == [
        {"__key__": "000", "__url__": str(path), "jpg": b"first", "txt": b"a caption"},
        {"__key__": "001", "__url__": str(path), "jpg": b"next"},
        {"__key__": "000", "__url__": str(path), "txt": b"again"},
    ]
    # webdataset raises at a duplicate and loses the rest of the shard; this reader drops the duplicate
    # alone, and names it.
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: duplicate member 000.jpg; the first one is kept",
        f"{path}: duplicate member 000.JPG; the first one is kept",
    ]


def signed_checksums(data: bytes, header_offsets: list[int]) -> bytes:
    """`data` with each header's checksum recomputed as old tar programs did, over signed bytes (POSIX
    says unsigned; tarfile and GNU tar accept either)."""
    out = bytearray(data)
    for offset in header_offsets:
        header = out[offset : offset + 512]
        signed = 8 * 32 + sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])
        out[offset + 148 : offset + 156] = b"%06o\0 " % signed
    return bytes(out)


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT], ids=["ustar", "gnu"])
def test_old_signed_byte_checksums_are_read_as_tarfile_reads_them(tmp_path, tar_format):
    # Non-ASCII names put bytes over 127 in the headers, where signed and unsigned sums differ.
    members = [
        ("caf\u00e9/000.txt", b"a caption"),
        ("caf\u00e9/000.jpg", b"\xff\xd8"),
        ("\u65e5/001.txt", b"x"),
    ]
    path = write_tar(tmp_path / "shard.tar", members, tar_format)
    with tarfile.open(path) as tar:
        offsets = [member.offset for member in tar.getmembers()]
    whole = path.read_bytes()
    path.write_bytes(signed_checksums(whole, offsets))
    assert path.read_bytes() != whole
    with tarfile.open(path) as tar:  # the reference accepts the old sums
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members
    ours = list(tar_samples(str(path)))
    assert ours == webdataset_samples(path)
    assert [(s["__key__"], sorted(s)) for s in ours] == [
        ("caf\u00e9/000", ["__key__", "__url__", "jpg", "txt"]),
        ("\u65e5/001", ["__key__", "__url__", "txt"]),
    ]

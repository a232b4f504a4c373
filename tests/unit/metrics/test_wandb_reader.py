"""The offline `.wandb` reader copes with a file W&B's service is still writing.

The file is written here by hand in W&B's framing (LevelDB log chunks in 32 KiB
blocks) so the reader's edge cases are exercised without starting W&B.
"""
import struct
import zlib

from ttrl.metrics.logger import _BLOCK, _wandb_records


def _framed(records: list[bytes]) -> bytes:
    """A `.wandb` file holding `records`, split across blocks the way LevelDB's log writer does."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 1))
    for rec in records:
        rest, first = rec, True
        while True:
            left = _BLOCK - len(out) % _BLOCK
            if left < 7:
                out += b"\0" * left
                left = _BLOCK
            piece, rest = rest[:left - 7], rest[left - 7:]
            kind = (1 if first else 4) if not rest else (2 if first else 3)
            out += struct.pack("<IHB", zlib.crc32(piece), len(piece), kind) + piece
            first = False
            if not rest:
                break
    return bytes(out)


def test_records_split_across_blocks_are_joined(tmp_path):
    recs = [b"a" * 100, b"b" * (_BLOCK + 500), b"c" * 10]
    f = tmp_path / "run.wandb"
    f.write_bytes(_framed(recs))
    assert _wandb_records(f) == recs


def test_a_half_written_tail_is_left_for_the_next_read(tmp_path):
    recs = [b"a" * 100, b"b" * 300]
    whole = _framed(recs)
    f = tmp_path / "run.wandb"
    f.write_bytes(whole[:-120])  # the writer has not finished the second record
    assert _wandb_records(f) == recs[:1]
    f.write_bytes(whole)
    assert _wandb_records(f) == recs

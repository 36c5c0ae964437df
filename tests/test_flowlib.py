import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.flowlib import (UNKNOWN_FLOW_THRESH, compute_color, evaluate_flow, flow_error,
                           flow_to_image, make_color_wheel, read_flow, save_flow_image, write_flow)


def test_no_matplotlib_at_import():
    # run in a fresh interpreter: other tests may already have imported matplotlib
    code = "import sys, tools.flowlib; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- .flo files
def test_write_flow_header_bytes_for_u_only_map(tmp_path):
    path = tmp_path / "u.flo"
    u = np.arange(20, dtype=np.float64).reshape(4, 5)  # H = 4, W = 5
    write_flow(u, path)
    raw = path.read_bytes()
    assert raw[:12].hex() == "50494548" "05000000" "04000000"
    assert raw[:4] == b"PIEH" and len(raw) == 12 + 8 * 4 * 5 == 172
    values = np.frombuffer(raw[12:], "<f4").reshape(4, 5, 2)
    np.testing.assert_array_equal(values[..., 0], u)
    np.testing.assert_array_equal(values[..., 1], 0)


def test_flo_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    flow = rng.normal(scale=20, size=(7, 3, 2)).astype(np.float32)
    write_flow(flow, tmp_path / "f.flo")
    back = read_flow(tmp_path / "f.flo")
    assert back.dtype == np.float32 and back.shape == (7, 3, 2)
    np.testing.assert_array_equal(back, flow)
    raw = (tmp_path / "f.flo").read_bytes()
    assert np.frombuffer(raw[4:12], "<i4").tolist() == [3, 7]  # width, then height
    np.testing.assert_array_equal(np.frombuffer(raw[12:24], "<f4"),  # interleaved (u, v)
                                  [flow[0, 0, 0], flow[0, 0, 1], flow[0, 1, 0]])


def test_read_flow_errors(tmp_path):
    bad = tmp_path / "bad.flo"
    bad.write_bytes(b"XXXX" + np.array([2, 2], "<i4").tobytes() + bytes(32))
    with pytest.raises(ValueError, match=r"bad\.flo: not a \.flo file: magic"):
        read_flow(bad)
    short = tmp_path / "short.flo"
    write_flow(np.zeros((3, 3, 2)), short)
    short.write_bytes(short.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        read_flow(short)
    tiny = tmp_path / "tiny.flo"
    tiny.write_bytes(b"PIEH")
    with pytest.raises(ValueError, match="12-byte header"):
        read_flow(tiny)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 3), (2, 2, 2, 2), (0, 3, 2)])
def test_write_flow_rejects_bad_shapes(tmp_path, shape):
    with pytest.raises(ValueError, match=r"flow: expected shape \(H, W, 2\)"):
        write_flow(np.zeros(shape), tmp_path / "x.flo")


# ---------------------------------------------------------------- colours
def test_color_wheel_segments():
    wheel = make_color_wheel()
    assert wheel.shape == (55, 3)
    # first entry of each segment: red, yellow, green, cyan, blue, magenta
    starts = {0: (255, 0, 0), 15: (255, 255, 0), 21: (0, 255, 0), 25: (0, 255, 255),
              36: (0, 0, 255), 49: (255, 0, 255)}
    for row, rgb in starts.items():
        assert tuple(wheel[row]) == rgb
    assert tuple(wheel[14]) == (255, 238, 0)   # floor(255 * 14 / 15)
    assert tuple(wheel[27]) == (0, 209, 255)   # 255 - floor(255 * 2 / 11)
    assert tuple(wheel[54]) == (255, 0, 43)    # 255 - floor(255 * 5 / 6)


def test_flow_to_image_hand_checked_colours():
    # max radius 2: the four directions are fully saturated, (1, 0) is half saturated
    vectors = [(2, 0), (-2, 0), (0, 2), (0, -2), (0, 0), (1, 0), (UNKNOWN_FLOW_THRESH * 10, 0)]
    flow = np.array(vectors, dtype=np.float32).reshape(1, -1, 2)
    flow_before = flow.copy()
    image = flow_to_image(flow)
    assert image.dtype == np.uint8 and image.shape == (1, 7, 3)
    expected = [
        (255, 0, 0),      # right: wheel entry 0
        (0, 209, 255),    # left: wheel entry 27
        (255, 229, 0),    # down (+v): halfway between entries 13 (221) and 14 (238)
        (88, 0, 255),     # up (-v): halfway between entries 40 (78) and 41 (98)
        (255, 255, 255),  # zero flow: white
        (255, 127, 127),  # half radius: 1 - 0.5 * (1 - colour)
        (0, 0, 0),        # unknown: black, and it does not count for the max radius
    ]
    assert [tuple(int(c) for c in px) for px in image[0]] == expected
    np.testing.assert_array_equal(flow, flow_before)


def test_compute_color_outside_unit_circle_and_nan():
    image = compute_color(np.array([[2.0, np.nan]]), np.array([[0.0, 0.0]]))
    assert image[0, 0].tolist() == [191, 0, 0]  # 0.75 * 255
    assert image[0, 1].tolist() == [0, 0, 0]


def test_save_flow_image_writes_png(tmp_path):
    flow = np.stack(np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 12)), axis=-1)
    path = save_flow_image(flow, tmp_path / "flow.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (16, 12)
        np.testing.assert_array_equal(np.asarray(image), flow_to_image(flow))
    with pytest.raises(ValueError, match="suffix"):
        save_flow_image(flow, tmp_path / "flow.unknown")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.png"]  # no temporary file left


# ---------------------------------------------------------------- errors
def test_flow_error_hand_example_and_inputs_untouched():
    tu = np.array([[1.0, 0.0], [1e8, 3.0]])
    tv = np.array([[0.0, 0.0], [0.0, 4.0]])
    u = np.array([[0.0, 5.0], [7.0, 0.0]])
    v = np.array([[0.0, 5.0], [7.0, 0.0]])
    copies = [a.copy() for a in (tu, tv, u, v)]
    # valid: (0, 0) with EPE 1 and (1, 1) with EPE 5; zero and unknown ground truth are left out
    assert flow_error(tu, tv, u, v) == pytest.approx(3.0, abs=1e-12)
    for array, copy in zip((tu, tv, u, v), copies):
        np.testing.assert_array_equal(array, copy)


def test_flow_error_edge_cases():
    zeros = np.zeros((2, 2))
    assert np.isnan(flow_error(zeros, zeros, zeros, zeros))
    with pytest.raises(ValueError, match="same shape"):
        flow_error(zeros, zeros, zeros, np.zeros((2, 3)))


def test_evaluate_flow(tmp_path):
    gt = np.zeros((2, 3, 2), np.float32)
    gt[..., 0] = 1.0
    pred = gt.copy()
    pred[0, 0] = (4.0, 4.0)  # EPE 5 at one of 6 pixels
    write_flow(gt, tmp_path / "gt.flo")
    write_flow(pred, tmp_path / "pred.flo")
    assert evaluate_flow(tmp_path / "gt.flo", tmp_path / "pred.flo") == pytest.approx(5 / 6)
    write_flow(np.zeros((3, 3, 2)), tmp_path / "other.flo")
    with pytest.raises(ValueError, match="does not match"):
        evaluate_flow(tmp_path / "gt.flo", tmp_path / "other.flo")

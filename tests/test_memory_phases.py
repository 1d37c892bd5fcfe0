"""benchmarks/probes/memory_phases.py on the CPU: a stand-in allocator counts what modules allocate; the
probe must put each module's peak on that module, in call order, and undo its hooks and wrappers."""
import pytest

torch = pytest.importorskip("torch")
from benchmarks.probes import memory_phases as mp  # noqa: E402


class _Memory:
    """allocated / peak bytes, as torch.cuda's counters behave (the peak restarts at mark)."""

    def __init__(self):
        self.now = self.top = 0

    def alloc(self, n):
        self.now += n
        self.top = max(self.top, self.now)

    def free(self, n):
        self.now -= n

    def mark(self):
        self.top = self.now
        return self.now

    def done(self):
        return self.top, self.now


class _Spike(torch.nn.Module):
    """Allocates ``temp`` bytes it frees before returning, and keeps ``keep``."""

    def __init__(self, mem, temp, keep):
        super().__init__()
        self.mem, self.temp, self.keep = mem, temp, keep

    def forward(self, x):
        self.mem.alloc(self.temp)
        self.mem.free(self.temp)
        self.mem.alloc(self.keep)
        return x


class _Net(torch.nn.Module):
    def __init__(self, mem):
        super().__init__()
        self.mem = mem
        self.a, self.b = _Spike(mem, 100, 10), torch.nn.Sequential(_Spike(mem, 500, 0), _Spike(mem, 50, 5))

    def prepare(self):
        self.mem.alloc(300)
        self.mem.free(300)

    def forward(self, x):
        self.prepare()
        return self.b(self.a(x))


def test_each_phase_gets_its_own_peak_in_call_order():
    mem = _Memory()
    net = _Net(mem)
    prepare = _Net.prepare

    def step():
        net(torch.zeros(1))
        mem.alloc(70)  # "backward"

    rows = mp.record(net, step, mem, wrap=((_Net, "prepare"),))
    names = [r["name"] for r in rows]
    assert names == ["_Net.prepare", "a", "b.0", "b.1", names[-1]] and "after it" in names[-1]
    got = {r["name"]: (r["before"], r["peak"], r["after"]) for r in rows}
    assert got["_Net.prepare"] == (0, 300, 0)
    assert got["a"] == (0, 100, 10)
    assert got["b.0"] == (10, 510, 10)
    assert got["b.1"] == (10, 60, 15)
    assert rows[-1]["after"] == 85 and rows[-1]["peak"] == 85  # the last phase and the "backward" after it
    assert _Net.prepare is prepare and not net.a._forward_hooks and not net.a._forward_pre_hooks
    text = mp.report(rows, 2)
    assert "step peak 0.0 MiB in b.0" in text and text.count("\n| ") == 3  # header + the top 2

"""freeze_gc_heap: the first engine of a process collects, then freezes the live objects out of the cyclic
collector's walks; garbage made before it is collected, not frozen; cycles made after it are still collected;
a deleted engine (frozen with its model) is freed by reference counting alone; NEMOTRON3_FREEZE_GC=0 leaves the collector alone. Each case runs in a fresh process (gc.freeze is process-wide
and applied once)."""

import json
import os
import subprocess
import sys

SCRIPT = """
import gc, json, weakref
from nemotron3 import LLM
from nemotron3.config import preset
from nemotron3.engine import gc_heap
from nemotron3.model import NemotronHForCausalLM

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

gc.disable()  # only explicit collections from here on: the engine's, then the one below
before = cycle()  # garbage when the engine starts: must be collected there, not frozen
tracked = len(gc.get_objects())
first = LLM(NemotronHForCausalLM(preset("tiny")), kv_cache_memory_bytes=4 << 20)
frozen_after_first = gc.get_freeze_count()
first.generate([[1, 2, 3]], None)
first_model = weakref.ref(first.engine.model)
del first  # frozen, so only reference counting can free it: the engine must hold no reference cycle
LLM(NemotronHForCausalLM(preset("tiny")), kv_cache_memory_bytes=4 << 20)
after = cycle()
gc.collect()
print(json.dumps({
    "frozen": gc_heap._frozen, "tracked": tracked, "freeze_count": frozen_after_first,
    "second_engine_froze": gc.get_freeze_count() > frozen_after_first,  # frozen objects can still be freed
    "before_collected": before() is None, "after_collected": after() is None,
    "first_engine_freed": first_model() is None,
}))
"""


def run(env_value: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NEMOTRON3_FREEZE_GC"}
    if env_value is not None:
        env["NEMOTRON3_FREEZE_GC"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_first_engine_freezes_the_live_heap():
    r = run()
    assert r["frozen"] is True
    assert r["freeze_count"] >= r["tracked"] * 0.9  # the objects alive before the engine, less the collected cycle
    assert not r["second_engine_froze"]  # once per process
    assert r["before_collected"] and r["after_collected"]
    assert r["first_engine_freed"]  # a notebook that replaces its LLM does not keep the old model alive


def test_the_environment_turns_it_off():
    r = run("0")
    assert r["frozen"] is False and r["freeze_count"] == 0
    assert r["before_collected"] and r["after_collected"]

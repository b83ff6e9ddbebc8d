"""An RL loop over two vlm-servicer workers behind SMG's RL control plane: rollouts, a training step, a refit.

    .venv/bin/python -m examples.rl_loop [--steps 3] [--workdir DIR]

Starts two workers on the trained tiny model (each with its control endpoint and a key), `smg launch --enable-rl`
in front of them, and registers each worker with its `rl.control_url`. Then, per step:
  1. rollouts, straight to the workers over gRPC: prompt ids and raw pixels in, sampled ids and their logprobs out
     (token-in/token-out: the trainer scores exactly the ids the policy saw and sampled, which an OpenAI chat API
     through the gateway would re-render and re-tokenize); one image per prompt, spread over the workers;
  2. a tiny training step: a few optimizer steps of tinytrain.finetune from the current checkpoint towards the
     "shifted" answers (red -> green, circle -> square, ...), the reward this loop pays for;
  3. a refit of every worker through SMG: inside `smg.rl.paused(...)`, a fan-out of `update_weights_from_disk`
     with the new checkpoint and version (each worker then updates its `weight_version` label in SMG, which
     1.13 does not do itself).
It prints, per step, the reward, a few answers and each worker's weight version.
"""

import argparse
import asyncio
import contextlib
import pathlib
import random
import secrets
import tempfile
import time
from dataclasses import dataclass, field

import grpc
from transformers import AutoProcessor

from harness.gateway import Gateway, launch_gateway
from harness.prompts import shapes_question
from harness.processes import SHAPES_MODEL, ServicerProcess, free_port, start_replicas
from smg.rl import RL, paused
from tinytrain import data
from tinytrain.finetune import finetune, shifted
from vlm_proto import vllm_engine_pb2_grpc as pb_grpc

SELECTOR = "rl.group=rollout"  # not `pool`: SMG routes by a worker's `pool` label (a "rollout" pool gets no chat traffic)
PROMPTS_PER_STEP = 8
TRAIN_STEPS = 25  # optimizer steps per RL step


@dataclass
class Cluster:
    """Two workers and the gateway in front of them."""

    workers: list[ServicerProcess]
    control_urls: list[str]
    gateway: Gateway
    key: str

    def stop(self) -> None:
        self.gateway.stop()
        for w in self.workers:
            w.stop()


@dataclass
class Rollout:
    sample: data.Sample
    kind: str  # "colour" or "shape"
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]  # of each sampled token, under the weights that sampled it
    answer: str
    reward: float
    versions: list[tuple[str, int, int]]  # (weight version, first token, end) spans
    worker: int


@dataclass
class StepReport:
    step: int
    version: str  # the weights the rollouts were sampled from
    checkpoint: str
    rollouts: list[Rollout] = field(default_factory=list)
    worker_versions: dict[str, str] = field(default_factory=dict)  # after this step's refit
    refit_seconds: float = 0.0

    @property
    def reward(self) -> float:
        return sum(r.reward for r in self.rollouts) / len(self.rollouts)


def launch(workdir: pathlib.Path, model: pathlib.Path = SHAPES_MODEL) -> Cluster:
    """Two workers with control endpoints (one key), SMG with its RL control plane in front of them. Each worker
    keeps its own entry in SMG labelled (`--register-with`: its rl.control_url, key, weight_version, rl.group)."""
    key = secrets.token_hex(16)
    key_file = workdir / "control.key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    gateway_port, control_ports = free_port(), [free_port(), free_port()]
    workers = start_replicas(2, workdir, lambda i: {"model": model, "flags": (
        "--control-port", str(control_ports[i]), "--control-api-key-file", str(key_file),
        "--register-with", f"http://127.0.0.1:{gateway_port}", "--register-labels", "rl.group=rollout",
        "--register-interval", "2")})
    gateway = None
    try:
        gateway = launch_gateway([w.url for w in workers], workdir / "smg.log", "--enable-rl", policy="round_robin",
                                 model=model, port=gateway_port)
        control_urls = [f"http://127.0.0.1:{p}" for p in control_ports]
        wait_registered(gateway, control_urls)
        return Cluster(workers, control_urls, gateway, key)
    except BaseException:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()
        raise


def wait_registered(gateway: Gateway, control_urls: list[str], timeout: float = 60.0) -> None:
    """Until SMG's RL plane lists every worker with its control URL."""
    rl, deadline = RL(gateway.url), time.monotonic() + timeout
    while {w.control_url for w in rl.workers()} != set(control_urls):
        if time.monotonic() > deadline:
            raise RuntimeError(f"SMG never listed the control URLs {control_urls}: {rl.workers()}")
        time.sleep(0.2)


class Rollouts:
    """Prompts in the trained model's format, sent to the workers as a gateway would (ids + raw uint8 patches)."""

    def __init__(self, model: pathlib.Path, hosts: list[str]):
        self.processor = AutoProcessor.from_pretrained(model)
        self.tokenizer = self.processor.tokenizer
        self.hosts = hosts
        self.target = shifted(1)

    async def run(self, step: int, n: int, seed: int) -> list[Rollout]:
        rng = random.Random(seed)
        jobs = [(data.make_sample(rng), rng.choice(list(data.QUESTIONS)), i % len(self.hosts)) for i in range(n)]
        channels = [grpc.aio.insecure_channel(h) for h in self.hosts]
        try:
            stubs = [pb_grpc.VllmEngineStub(c) for c in channels]
            return list(await asyncio.gather(*(self._one(stubs[w], sample, kind, w, f"step{step}-{i}", seed + i)
                                               for i, (sample, kind, w) in enumerate(jobs))))
        finally:
            for c in channels:
                await c.close()

    async def _one(self, stub, sample, kind, worker, request_id, seed) -> Rollout:
        request = shapes_question(self.processor, sample, kind, temperature=1.0, max_tokens=4, logprobs=0, seed=seed)
        request.request_id = request_id
        [done] = [r.complete async for r in stub.Generate(request)]
        answer = self.tokenizer.decode(list(done.output_ids), skip_special_tokens=True).strip()
        return Rollout(sample, kind, list(request.tokenized.input_ids), list(done.output_ids), list(done.output_logprobs.token_logprobs), answer,
                       float(answer == self.target[sample.answer(kind)]),
                       [(s.version, s.start, s.end) for s in done.weight_versions], worker)


def refit(gateway: Gateway, key: str, checkpoint: pathlib.Path, version: str) -> tuple[dict[str, str], float]:
    """Every worker in the pool takes `checkpoint` through SMG's fan-out; returns each worker's version after."""
    rl = RL(gateway.url)
    started = time.monotonic()
    with paused(rl, SELECTOR, mode="wait"):
        rl.fanout("update_weights_from_disk", {"model_path": str(checkpoint.resolve()), "weight_version": version},
                  selector=SELECTOR)
    seconds = time.monotonic() - started
    versions = {wid: r.body["weight_version"]
                for wid, r in rl.fanout("get_weight_version", {}, selector=SELECTOR).results.items()}
    return versions, seconds


def run(cluster: Cluster, workdir: pathlib.Path, steps: int = 3, model: pathlib.Path = SHAPES_MODEL,
        train_steps: int = TRAIN_STEPS, log=print) -> list[StepReport]:
    rollouts = Rollouts(model, [w.host for w in cluster.workers])
    checkpoint, version, reports = model, "default", []
    for step in range(1, steps + 1):
        report = StepReport(step, version, str(checkpoint))
        report.rollouts = asyncio.run(rollouts.run(step, PROMPTS_PER_STEP, seed=1000 * step))
        new_checkpoint = workdir / f"policy-step{step}"
        finetune(checkpoint, new_checkpoint, steps=train_steps, seed=step, eval_images=20, log=lambda _: None)
        checkpoint, version = new_checkpoint, f"step-{step}"
        report.worker_versions, report.refit_seconds = refit(cluster.gateway, cluster.key, checkpoint, version)
        reports.append(report)
        shown = ", ".join(f"{r.sample.answer(r.kind)}->{r.answer}" for r in report.rollouts[:4])
        log(f"step {step}: rollouts on weights {report.version!r}: reward {report.reward:.2f} ({shown}, ...); "
            f"refit to {version} in {report.refit_seconds:.2f} s; workers now at {sorted(report.worker_versions.values())}")
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", type=pathlib.Path, help="checkpoints and logs (default: a temporary folder)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rl-loop-")))
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"starting two workers and SMG (logs in {workdir}) ...", flush=True)
        cluster = launch(workdir)
        stack.callback(cluster.stop)
        run(cluster, workdir, args.steps)


if __name__ == "__main__":
    main()

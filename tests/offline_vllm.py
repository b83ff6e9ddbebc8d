"""vLLM's own offline API as a second reference for constrained decoding (run as a subprocess).

    python -m tests.offline_vllm OUT.json < cases.json

Each case: {"ids": [...], "sample": i, "constraint": {"json": ...} | {"regex": ...} | ...} with
`sample` an index into the held-out shapes images (regenerated here from the same seed). vLLM runs
its own HF processor on the image and expands the one placeholder itself; greedy output ids come back.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    spec = json.load(sys.stdin)
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=4096, enforce_eager=True,
              kv_cache_memory_bytes=1 << 30, limit_mm_per_prompt={"image": 8, "video": 0},
              structured_outputs_config=spec["structured_outputs_config"])
    from tinytrain import data

    samples = [s for s, kind, _, _ in data.held_out(spec["seed"], spec["images"]) if kind == "colour"]
    prompts = [TokensPrompt(prompt_token_ids=c["ids"], multi_modal_data={"image": samples[c["sample"]].image})
               for c in spec["cases"]]
    params = [SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"],
                             structured_outputs=StructuredOutputsParams(**c["constraint"])) for c in spec["cases"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    with open(sys.argv[1], "w") as out:  # not stdout: vLLM logs there
        json.dump([list(o.outputs[0].token_ids) for o in outputs], out)


if __name__ == "__main__":
    main()

"""The GPU check's two halves (driven by scripts/gpu-check.sh; needs only torch, transformers and
the `ferroformers` binary):

  parity  every pipeline case of the committed parity fixtures (tests/fixtures: encoders,
          decoders, seq2seq, whisper) through `ferroformers run --device D --dtype T`, compared
          with the committed transformers outputs: f32 within the parity tests' tolerance (1e-4,
          relative above 1), f16/bf16 within their own (5e-2 / 1e-1) with labels and generated
          text counted but not failed (tiny random models have near-tied logits).
  bench   MiniLM-L6 embeddings (batch 1/32/256) and SmolLM2-135M greedy generation (batch 1 and
          32) on the same device: ours (the CLI, --timing) against torch/transformers, alternating.
          The weights are random (seeded) and made here from the carried configs and tokenizers:
          the real checkpoints do not fit the device's 64 MiB transfer limit, and speed does not
          depend on the values. Ours and torch load the same files; their outputs are compared too.

  serve   `ferroformers serve --device D` with the same random MiniLM and SmolLM2 (f32): TEI's
          /embed and OpenAI's /v1/completions answer what `run` gives on the same device, /info
          names the device, and 16 concurrent completions (the continuous batch on the GPU)
          answer the texts they give one at a time; timings of 1 and of 16 at once.

Results: JSON files under --out (parity-<dtype>.json, bench.json, serve.json) and a log on
stdout.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TOL = {"f32": 1e-4, "f16": 5e-2, "bf16": 1e-1}


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- parity


def cases():
    """(name, model dir, task, call, inputs, params, batch_size, outputs) of every fixture case."""
    for f in sorted((FIX / "expected").glob("*.json")):
        d = json.loads(f.read_text())
        model = FIX / "models" / d.get("model", f.stem)
        if f.stem.startswith("train-") or not model.is_dir():
            continue
        for i, c in enumerate(d.get("pipelines", [])):
            yield (f"{f.stem}#{i}", model, c["task"], c["call"], c["inputs"], c["params"],
                   c.get("batch_size"), c["outputs"])
    for f in sorted((FIX / "decoders" / "expected").glob("*.json")):
        d = json.loads(f.read_text())
        for i, c in enumerate(d.get("pipelines", [])):
            inp, out = c["inputs"], c["outputs"]
            if isinstance(inp, str):
                inp, out = [inp], [out]
            elif all(isinstance(x, dict) for x in inp):  # one chat
                inp, out = [{"messages": inp}], [out]
            yield (f"decoders/{f.stem}#{i}", FIX / "decoders" / "models" / f.stem,
                   "text-generation", "single", inp, c["params"], None, out)
    for f in sorted((FIX / "seq2seq" / "expected").glob("*.json")):
        if f.stem == "bert-no-entailment":
            continue  # refused on purpose (no entailment label): parity_zero_shot.rs checks it
        d = json.loads(f.read_text())
        for i, c in enumerate(d.get("pipelines", [])):
            yield (f"seq2seq/{f.stem}#{i}", FIX / "seq2seq" / "models" / f.stem, c["task"],
                   c["call"], c["inputs"], c["params"], c.get("batch_size"), c["outputs"])
    for f in sorted((FIX / "whisper" / "expected").glob("*.json")):
        d = json.loads(f.read_text())
        for i, c in enumerate(d.get("pipelines", [])):
            if not all("path" in x for x in c["inputs"]):
                continue  # raw arrays: the CLI reads files
            inputs = [str(FIX / "whisper" / x["path"]) for x in c["inputs"]]
            out = c.get("outputs", c.get("output"))
            outs = out if c["call"] == "list" else [out]
            params = dict(c["params"])
            batch = params.pop("batch_size", None)
            yield (f"whisper/{f.stem}#{i}", FIX / "whisper" / "models" / f.stem,
                   "automatic-speech-recognition", c["call"], inputs, params, batch, outs)


def compare(ours, want, tol, path, soft):
    """First difference as a string, or None. `soft` collects label/text differences instead
    of failing on them (reduced precision)."""
    if isinstance(want, bool) or want is None:
        return None if ours == want else f"{path}: {ours!r} != {want!r}"
    if isinstance(want, (int, float)) and isinstance(ours, (int, float)):
        if isinstance(want, int) and isinstance(ours, int) and not path.endswith("score"):
            if ours == want:
                return None
            if soft is not None:
                soft.append(path)
                return None
            return f"{path}: {ours} != {want}"
        return None if abs(ours - want) <= tol * max(abs(want), 1.0) else \
            f"{path}: {ours} vs {want} (tol {tol})"
    if isinstance(want, str):
        if ours == want:
            return None
        if soft is not None:
            soft.append(path)
            return None
        return f"{path}: {ours!r} != {want!r}"
    if isinstance(want, list):
        if not isinstance(ours, list) or len(ours) != len(want):
            if soft is not None and isinstance(ours, list):
                soft.append(path)
                return None
            return f"{path}: length {len(ours) if isinstance(ours, list) else ours!r} != {len(want)}"
        for i, (a, b) in enumerate(zip(ours, want)):
            e = compare(a, b, tol, f"{path}[{i}]", soft)
            if e:
                return e
        return None
    if isinstance(want, dict):
        if isinstance(ours, list) and len(ours) == 1:
            ours = ours[0]  # one generated sequence: HF's list call flattens it
        if not isinstance(ours, dict):
            return f"{path}: {ours!r} is not an object"
        for k in want:
            if k not in ours:
                return f"{path}.{k} missing"
            e = compare(ours[k], want[k], tol, f"{path}.{k}", soft)
            if e:
                return e
        return None
    return None if ours == want else f"{path}: {ours!r} != {want!r}"


def normalise(task, call, params, inp, want):
    """The parity tests' reading of a reference: `pipe("text")` wraps text-classification's
    dict in a list."""
    if task == "text-classification" and call == "single" and "top_k" not in params \
            and isinstance(inp, str) and isinstance(want, list) and want:
        return want[0]
    return want


def run_cli(binary, args, inputs, work, timeout=600):
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "inputs.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in inputs))
    p = subprocess.run([binary, "run", *args, "--input", str(inp), "--timing"],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else
                           f"exit {p.returncode}")
    outs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    timing = {}
    for line in p.stderr.splitlines():
        if line.startswith("{"):
            try:
                timing = json.loads(line)
            except ValueError:
                pass
    return outs, timing


def run_case(a, case, slot):
    name, model, task, call, inputs, params, batch, want = case
    args = [task, "--model", str(model), "--device", a.device, "--dtype", a.dtype]
    for k, v in params.items():
        args += ["--param", f"{k}={json.dumps(v)}"]
    if call == "list" and batch:
        args += ["--batch-size", str(batch)]
    soft = [] if a.dtype != "f32" else None
    t0 = time.time()
    if a.deadline and t0 > a.deadline:
        return {"case": name, "task": task, "ok": True, "skipped": True, "error": None,
                "soft_differences": [], "soft_count": 0, "seconds": 0.0}
    try:
        got, _ = run_cli(a.bin, args, inputs, Path(a.work) / "parity" / str(slot), timeout=180)
        want = [normalise(task, call, params, x, w) for x, w in zip(inputs, want)]
        if task == "feature-extraction" and call == "list":
            # HF's batched hidden states run to the padded length; ours stop at each input's.
            for o, w in zip(got, want):
                if isinstance(o, list) and o and isinstance(w, list) and w:
                    w[0] = w[0][:len(o[0])]
        if len(got) != len(want):
            err = f"{len(got)} outputs for {len(want)} expected"
        else:
            err = compare(got, want, TOL[a.dtype], "out", soft)
    except Exception as e:  # noqa: BLE001 (a failing case is a result, not a crash)
        err = f"error: {e}"
    return {"case": name, "task": task, "ok": err is None, "error": err,
            "soft_differences": (soft or [])[:10], "soft_count": len(soft or []),
            "seconds": round(time.time() - t0, 2)}


def parity(a):
    from concurrent.futures import ThreadPoolExecutor
    tol = TOL[a.dtype]
    todo, per_file = [], {}
    for c in cases():
        f = c[0].split("#")[0]
        per_file[f] = per_file.get(f, 0) + 1
        if a.per_fixture and per_file[f] > a.per_fixture:
            continue
        todo.append(c)
    def one(ic):
        r = run_case(a, ic[1], ic[0])
        # Logged as each case ends, so a run cut short still says what it saw.
        if not r.get("skipped"):
            log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']} {r['task']} {r['seconds']}s" +
                (f": {r['error']}" if r["error"] else "") +
                (f" ({r['soft_count']} label/text differences)" if r["soft_count"] else ""))
        return r

    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(one, enumerate(todo)))
    skipped = sum(bool(r.get("skipped")) for r in results)
    fails = sum(not r["ok"] for r in results)
    soft_total = sum(r["soft_count"] for r in results)
    summary = {"device": a.device, "dtype": a.dtype, "tolerance": tol, "cases": len(results),
               "failed": fails, "skipped_at_deadline": skipped,
               "label_or_text_differences": soft_total, "results": results}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"parity-{a.dtype}.json").write_text(json.dumps(summary, indent=1))
    log(f"parity {a.device} {a.dtype}: {len(results) - fails - skipped}/{len(results)} cases"
        f" pass, {fails} fail, {skipped} not run (deadline)"
        f" ({soft_total} label/text differences)")
    return fails == 0


# ---------------------------------------------------------------- bench


def texts(n):
    corpus = (ROOT / "scripts" / "corpus.txt").read_text().split("\n")
    corpus = [line.strip() for line in corpus if line.strip()]
    return [corpus[i % len(corpus)] for i in range(n)]


def make_models(carry, work, torch, transformers):
    """Seeded random weights for the carried configs, saved as safetensors beside copies of the
    carried tokenizer files."""
    import shutil
    made = {}
    for name, cls, dtype in [("minilm", "AutoModel", torch.float32),
                             ("smollm2", "AutoModelForCausalLM", torch.bfloat16)]:
        src, dst = Path(carry) / name, Path(work) / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.from_pretrained(dst)
        model = getattr(transformers, cls).from_config(cfg).to(dtype)
        model.save_pretrained(dst)  # safetensors (the default in 4.x, the only format in 5.x)
        # save_pretrained rewrites config.json: keep the carried one (its torch_dtype is the
        # real checkpoint's).
        shutil.copy(src / "config.json", dst / "config.json")
        made[name] = dst
    return made


def sync(torch, dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def torch_embed(torch, transformers, path, dev, sents, batch, dtype):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).to(dev, dtype).eval()
    out = []

    def run():
        # Batches of similar length, as sentence-transformers' `encode` makes them (ours are
        # length-sorted too): texts ordered by length, cut into batches, results put back.
        order = sorted(range(len(sents)), key=lambda i: -len(sents[i]))
        out.clear()
        with torch.inference_mode():
            for i in range(0, len(sents), batch):
                enc = tok([sents[j] for j in order[i:i + batch]], padding=True,
                          truncation=True, max_length=256, return_tensors="pt").to(dev)
                h = model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).float()
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        sync(torch, dev)
        got = torch.cat(out)
        back = torch.empty_like(got)
        back[torch.tensor(order)] = got
        return back
    run()  # warm-up
    t0 = time.perf_counter()
    res = run()
    return time.perf_counter() - t0, res


def torch_generate(torch, transformers, path, dev, prompts, new_tokens, dtype):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(path).to(dev, dtype).eval()
    enc = tok(prompts, padding=True, return_tensors="pt").to(dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        model.generate(**enc, **kw)  # warm-up: the same whole run, as ours gets (--warmup)
        sync(torch, dev)
        t0 = time.perf_counter()
        ids = model.generate(**enc, **kw)
        sync(torch, dev)
        dt = time.perf_counter() - t0
    new = ids[:, enc["input_ids"].shape[1]:]
    return dt, tok.batch_decode(new, skip_special_tokens=True)


def bench(a):
    import torch
    import transformers
    dev = a.device
    work = Path(a.work)
    models = make_models(a.carry, work / "models", torch, transformers)
    tdtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    q = a.quick
    # Embeddings: f32 (the parity baseline) and f16 on GPU.
    emb_dtypes = ["f32"] + (["f16"] if dev.startswith("cuda") else [])
    info = {"device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "weights": "random (seeded), real shapes"}
    Path(a.out).mkdir(parents=True, exist_ok=True)

    def save(row):
        # Written after every row, so a run cut short keeps what it measured.
        rows.append(row)
        log(json.dumps(row))
        (Path(a.out) / "bench.json").write_text(json.dumps({"info": info, "rows": rows},
                                                           indent=1))

    def late(what):
        if a.deadline and time.time() > a.deadline:
            log(f"bench: {what} not run (deadline)")
            return True
        return False

    for dt in emb_dtypes if a.only in ("", "minilm") else []:
        for batch in (1, 32, 256):
            if late(f"minilm {dt} batch {batch}"):
                continue
            n = (64 if batch == 1 else 1024) // (8 if q else 1)
            n = max(n, batch)
            sents = texts(n)
            ours_t, torch_t, cos = [], [], None
            for rep in range(a.reps):
                # --warmup: one untimed pass first, as torch_embed gives torch.
                outs, timing = run_cli(a.bin, ["sentence-embeddings", "--model",
                                               str(models["minilm"]), "--device", dev,
                                               "--dtype", dt, "--batch-size", str(batch),
                                               "--warmup"],
                                       sents, work / "bench")
                ours_t.append(timing["run_s"])
                t, ref = torch_embed(torch, transformers, models["minilm"], dev, sents, batch,
                                     tdtype[dt])
                torch_t.append(t)
                if cos is None:
                    mine = torch.tensor(outs, dtype=torch.float32)
                    cos = float(torch.nn.functional.cosine_similarity(mine, ref).min())
            row = {"bench": "minilm-embeddings", "dtype": dt, "batch": batch, "texts": n,
                   "ours_s": statistics.median(ours_t), "torch_s": statistics.median(torch_t),
                   "ours_texts_per_s": n / statistics.median(ours_t),
                   "torch_texts_per_s": n / statistics.median(torch_t),
                   "min_cosine_ours_vs_torch": cos, "reps": a.reps}
            row["speedup"] = row["torch_s"] / row["ours_s"]
            save(row)
    # Generation: bf16 (the checkpoint's dtype) on GPU, f32 on CPU.
    gdt = "bf16" if dev.startswith("cuda") else "f32"
    new = 16 if q else 128
    for batch in (1, 32) if a.only in ("", "smollm2") else ():
        if late(f"smollm2 batch {batch}"):
            continue
        prompts = texts(batch)
        ours_t, torch_t, agree = [], [], None
        for rep in range(a.reps):
            # --warmup: a whole untimed pass first, as torch_generate gives torch.
            outs, timing = run_cli(a.bin, ["text-generation", "--model", str(models["smollm2"]),
                                           "--device", dev, "--dtype", gdt, "--warmup",
                                           "--batch-size", str(batch),
                                           "--param", f"max_new_tokens={new}",
                                           "--param", f"min_new_tokens={new}",
                                           "--param", "do_sample=false",
                                           "--param", "return_full_text=false"],
                                   prompts, work / "bench")
            ours_t.append(timing["run_s"])
            t, ref = torch_generate(torch, transformers, models["smollm2"], dev, prompts, new,
                                    tdtype[gdt])
            torch_t.append(t)
            if agree is None:
                # Greedy texts of the same random weights: the share of sequences that match
                # (reduced precision can flip near-tied argmaxes, after which texts diverge).
                mine = [(o[0] if isinstance(o, list) else o).get("generated_text", "")
                        for o in outs]
                agree = sum(m == r for m, r in zip(mine, ref)) / max(1, len(ref))
        row = {"bench": "smollm2-generate", "dtype": gdt, "batch": batch, "new_tokens": new,
               "ours_s": statistics.median(ours_t), "torch_s": statistics.median(torch_t),
               "ours_tokens_per_s": batch * new / statistics.median(ours_t),
               "torch_tokens_per_s": batch * new / statistics.median(torch_t),
               "greedy_texts_equal": agree, "reps": a.reps}
        row["speedup"] = row["torch_s"] / row["ours_s"]
        save(row)
    # Random weights give near-tied logits, so bf16 texts part early: the same greedy run in
    # f32 (one pass, 32 prompts) says whether the GPU path itself agrees with torch.
    if gdt != "f32" and a.only in ("", "smollm2") and not late("smollm2 f32 agreement"):
        prompts, n32 = texts(32), 32
        outs, _ = run_cli(a.bin, ["text-generation", "--model", str(models["smollm2"]),
                                  "--device", dev, "--dtype", "f32", "--batch-size", "32",
                                  "--param", f"max_new_tokens={n32}",
                                  "--param", f"min_new_tokens={n32}",
                                  "--param", "do_sample=false",
                                  "--param", "return_full_text=false"],
                          prompts, work / "bench")
        _, ref = torch_generate(torch, transformers, models["smollm2"], dev, prompts, n32,
                                torch.float32)
        mine = [(o[0] if isinstance(o, list) else o).get("generated_text", "") for o in outs]
        save({"bench": "smollm2-greedy-agreement", "dtype": "f32", "batch": 32,
              "new_tokens": n32, "greedy_texts_equal": sum(m == r for m, r in zip(mine, ref))
              / len(ref), "first_difference": next(([m, r] for m, r in zip(mine, ref)
                                                     if m != r), None)})


def http(method, url, body=None, timeout=120):
    import urllib.error
    import urllib.request
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def serve(a):
    """The server on the device: answers against `run`'s on the same device, then concurrency."""
    import threading
    import torch
    import transformers
    dev, work = a.device, Path(a.work)
    models = make_models(a.carry, work / "models", torch, transformers)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    res = {"device": dev, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "checks": {}}
    ok = True

    def check(name, passed, **detail):
        nonlocal ok
        ok &= bool(passed)
        res["checks"][name] = {"ok": bool(passed), **detail}
        log(f"{'ok  ' if passed else 'FAIL'} serve {name} {json.dumps(detail)[:300]}")
        (Path(a.out) / "serve.json").write_text(json.dumps(res, indent=1))

    port = 38000 + (int(time.time()) % 1000)
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([a.bin, "serve", "--model", f"{models['minilm']}=sentence-embeddings",
                               "--model", f"{models['smollm2']}=text-generation",
                               "--device", dev, "--dtype", "f32", "--port", str(port),
                               "--max-client-batch-size", "64"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            if server.poll() is not None:
                raise RuntimeError("the server exited: " + server.stdout.read()[-2000:])
            try:
                if http("GET", base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        res["load_s"] = round(time.time() - t0, 2)
        st, info = http("GET", base + "/info")
        check("info", st == 200 and info.get("model_device_type") == ("cpu" if dev == "cpu"
                                                                     else "cuda")
              and info.get("model_dtype") == "float32", info=info)
        sents = texts(24)
        st, emb = http("POST", base + "/embed", {"inputs": sents})
        ref, _ = run_cli(a.bin, ["sentence-embeddings", "--model", str(models["minilm"]),
                                 "--device", dev, "--dtype", "f32"], sents, work / "serve")
        diff = max(abs(x - y) for e, r in zip(emb, ref) for x, y in zip(e, r)) \
            if st == 200 else None
        check("embed", st == 200 and len(emb) == len(sents) and diff <= 1e-4,
              status=st, max_abs_diff=diff)
        prompts, new = texts(16), 24
        ref, _ = run_cli(a.bin, ["text-generation", "--model", str(models["smollm2"]),
                                 "--device", dev, "--dtype", "f32",
                                 "--param", f"max_new_tokens={new}",
                                 "--param", f"min_new_tokens={new}",
                                 "--param", "do_sample=false",
                                 "--param", "return_full_text=false"], prompts, work / "serve")
        ref = [(o[0] if isinstance(o, list) else o).get("generated_text", "") for o in ref]

        def complete(p):
            t = time.perf_counter()
            st, body = http("POST", base + "/v1/completions",
                            {"model": "smollm2", "prompt": p, "max_tokens": new,
                             "min_tokens": new, "temperature": 0})
            text = body["choices"][0]["text"] if st == 200 else body
            return st, text, time.perf_counter() - t

        one = [complete(p) for p in prompts[:4]]
        check("completions", all(st == 200 for st, _, _ in one)
              and [t for _, t, _ in one] == ref[:4],
              equal=sum(t == r for (_, t, _), r in zip(one, ref)), of=4,
              seconds=[round(s, 3) for _, _, s in one])
        outs = [None] * len(prompts)

        def worker(i):
            outs[i] = complete(prompts[i])
        t = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        equal = sum(o is not None and o[1] == r for o, r in zip(outs, ref))
        # Greedy f32 in a batch of 16 and alone: the same texts unless a batch-dependent
        # rounding flips a near-tied logit of these random weights (counted, all must answer).
        check("concurrent", all(o is not None and o[0] == 200 for o in outs),
              equal=equal, of=len(prompts), wall_s=round(wall, 3),
              tokens_per_s=round(len(prompts) * new / wall, 1),
              single_tokens_per_s=round(new / statistics.median(s for _, _, s in one), 1),
              latency_s=sorted(round(o[2], 3) for o in outs if o))
    except Exception as e:  # noqa: BLE001 - reported in the results
        check("server", False, error=str(e)[-2000:])
    finally:
        server.terminate()
        try:
            tail = server.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            tail = server.communicate()[0]
        res["server_log_tail"] = tail[-3000:]
        (Path(a.out) / "serve.json").write_text(json.dumps(res, indent=1))
    log(f"serve {dev}: {'all checks pass' if ok else 'FAILED'}")
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["parity", "bench", "serve"])
    p.add_argument("--bin", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="f32", choices=list(TOL))
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/gpu-check")
    p.add_argument("--carry", default=str(ROOT / ".gpu-carry" / "models"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--jobs", type=int, default=4, help="parity cases run at once")
    p.add_argument("--per-fixture", type=int, default=0,
                   help="at most this many cases per fixture file (0: all)")
    p.add_argument("--quick", action="store_true", help="fewer texts and tokens (CPU dry run)")
    p.add_argument("--only", default="", choices=["", "minilm", "smollm2"],
                   help="bench: one model's rows only")
    p.add_argument("--seconds", type=float, default=0,
                   help="start nothing new after this many seconds (0: no limit); what was "
                        "not run is reported as such")
    a = p.parse_args()
    a.deadline = time.time() + a.seconds if a.seconds else 0
    if a.what == "parity":
        sys.exit(0 if parity(a) else 1)
    if a.what == "serve":
        sys.exit(0 if serve(a) else 1)
    bench(a)


if __name__ == "__main__":
    main()

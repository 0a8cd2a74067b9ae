"""`ayar ui`'s page (gradio): Train, Runs, Chat, Evaluate, Export & serve. Layout and wiring only; what each
button does is a handler in train_form / runs / chat / stages, over the same API functions the CLI calls."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os
import shutil
import time
from pathlib import Path

from ayar.errors import AyarError
from ayar.ui import chat, runs, stages, train_form
from ayar.ui.jobs import Jobs
from ayar.ui.workspace import Workspace

REFRESH_S = 2.0  # how often the page re-reads the run directories


def build(ws: Workspace, jobs: Jobs | None = None):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    jobs = jobs or Jobs(ws.jobs)
    models = chat.Models(ws)
    defaults = train_form.TrainForm()
    safe = _safe

    with gr.Blocks(title="ayar") as page:
        gr.Markdown(
            f"## ayar: fine-tune, check, chat, export\nWorking folder `{ws.root}`, runs in `{ws.relative(ws.runs)}`. "
            "Every step here is also a command (`ayar train`, `ayar eval`, `ayar export`, `ayar serve`)."
        )
        shown = gr.State({})  # per browser tab: what the last refresh sent (index -> key)
        run_pick = gr.Dropdown(
            label="Run (for Runs, Evaluate, Export & serve)",
            choices=runs.names(ws, jobs),
            value=next(iter(runs.names(ws, jobs)), None),
            allow_custom_value=True,
            elem_id="run-pick",
        )
        with gr.Tabs():
            # --- Train -------------------------------------------------------------------------------------
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    model = gr.Textbox(
                        defaults.model,
                        label="Model: `default`, a model folder, or a run to continue from",
                        elem_id="model",
                    )
                    data = gr.Textbox(
                        defaults.data, label="Data: a file or folder here, or sample:gsm8k", elem_id="data"
                    )
                    upload = gr.File(
                        label="or upload a data file",
                        file_types=[".jsonl", ".json", ".csv", ".parquet", ".txt"],
                        elem_id="upload",
                        height=120,
                    )
                with gr.Row():
                    fmt = gr.Dropdown(list(train_form.FORMATS), value="auto", label="Format", elem_id="format")
                    columns = gr.Textbox(label="Columns (field=column, ...)", placeholder="instruction=question")
                    method = gr.Dropdown(list(train_form.METHODS), value=defaults.method, label="Method")
                    stage = gr.Dropdown(list(train_form.STAGES), value=defaults.stage, label="Stage")
                    pref_loss = gr.Dropdown(
                        list(train_form.PREFERENCE_LOSSES), value="dpo", label="Preference loss (stage dpo)"
                    )
                with gr.Row():
                    max_steps = gr.Number(defaults.max_steps, label="Steps", precision=0, elem_id="max-steps")
                    lr = gr.Number(defaults.learning_rate, label="Learning rate")
                    lora_r = gr.Number(defaults.lora_r, label="LoRA rank", precision=0)
                    max_length = gr.Number(defaults.max_length, label="Max tokens per row", precision=0)
                    processes = gr.Number(
                        defaults.processes, label="Processes (one per GPU)", precision=0, minimum=1, elem_id="processes"
                    )
                    strategy = gr.Dropdown(
                        list(train_form.STRATEGIES),
                        value=defaults.strategy,
                        label="Processes share the model (ddp: each holds it; fsdp, zero2, zero3: split)",
                        elem_id="strategy",
                    )
                    name = gr.Textbox(label="Run name", placeholder="sft-lora", elem_id="run-name")
                with gr.Accordion("Advanced: any config key, as YAML", open=False):
                    advanced = gr.Code(
                        "", language="yaml", label="e.g. training: {batch_size: 4, eval_steps: 10}", elem_id="advanced"
                    )
                form_inputs = [
                    model,
                    data,
                    fmt,
                    columns,
                    method,
                    stage,
                    pref_loss,
                    max_steps,
                    lr,
                    lora_r,
                    max_length,
                    processes,
                    strategy,
                    name,
                    advanced,
                ]
                with gr.Row():
                    check_btn = gr.Button("Check", elem_id="check")
                    start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                check_md = gr.Markdown(elem_id="check-result")
                start_md = gr.Markdown(elem_id="start-result")
                with gr.Row():
                    lint_box = gr.Textbox(label="Data lint", lines=6, elem_id="lint")
                    plan_box = gr.Textbox(label="Memory plan", lines=6, elem_id="plan")
                preview = gr.HTML(label="Rows as the model sees them", elem_id="preview")
                yaml_box = gr.Code(
                    label="The config (runnable as `ayar train config.yaml`)", language="yaml", elem_id="yaml"
                )

            # --- Runs --------------------------------------------------------------------------------------
            with gr.Tab("Runs", id="runs"):
                table = gr.Dataframe(
                    headers=runs.COLUMNS, value=runs.table(ws, jobs), interactive=False, elem_id="runs-table"
                )
                progress_md = gr.Markdown(elem_id="run-progress")
                with gr.Row():
                    stop_btn = gr.Button("Stop (checkpoint)", elem_id="stop")
                    resume_btn = gr.Button("Resume", elem_id="resume")
                run_msg = gr.Markdown(elem_id="run-message")
                plot = gr.LinePlot(x="step", y="value", color="series", title="loss", elem_id="loss-plot", height=300)
                with gr.Accordion("Log and config", open=False):
                    log_box = gr.Textbox(label="Log (end)", lines=10, elem_id="run-log")
                    config_box = gr.Code(label="config.yaml", language="yaml")
                with gr.Accordion("Compare runs", open=False):
                    compare_pick = gr.Dropdown(label="Runs", multiselect=True, choices=runs.names(ws))
                    compare_btn = gr.Button("Compare")
                    compare_table = gr.Dataframe(interactive=False)
                    compare_plot = gr.LinePlot(x="step", y="value", color="series", title="loss", height=300)

            # --- Chat --------------------------------------------------------------------------------------
            with gr.Tab("Chat", id="chat") as chat_tab:
                with gr.Row():
                    left = gr.Dropdown(chat.choices(ws), value="default", label="Left", elem_id="chat-left-pick")
                    right = gr.Dropdown(
                        chat.choices(ws), value=None, label="Right (optional)", elem_id="chat-right-pick"
                    )
                    refresh_models = gr.Button("Refresh model list", size="sm")
                with gr.Row():
                    left_box = gr.Chatbot(label="Left", elem_id="chat-left", height=360)
                    right_box = gr.Chatbot(label="Right", elem_id="chat-right", height=360)
                prompt = gr.Textbox(label="Message", placeholder="Ask both models", elem_id="chat-input")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    clear = gr.Button("New conversation")
                chat_msg = gr.Markdown(elem_id="chat-message")
                with gr.Accordion("Generation and system prompt", open=False):
                    preset = gr.Radio(["deterministic", "creative"], value="deterministic", label="Preset")
                    max_new = gr.Slider(8, 1024, value=128, step=8, label="Max new tokens")
                    temperature = gr.Slider(0.1, 1.5, value=0.8, step=0.05, label="Temperature (creative)")
                    system = gr.Textbox(label="System prompt", lines=2)
                with gr.Accordion("Personalization profile (as the server's /v1/users profiles)", open=False):
                    p_name = gr.Textbox(label="Name")
                    p_expertise = gr.Textbox(label="Expertise")
                    p_interests = gr.Textbox(label="Interests (comma-separated)")
                    p_tone = gr.Textbox(label="Tone")
                    p_language = gr.Textbox(label="Language")
                    p_notes = gr.Textbox(label="Notes")

            # --- Evaluate ----------------------------------------------------------------------------------
            with gr.Tab("Evaluate", id="evaluate"):
                with gr.Row():
                    eval_data = gr.Textbox(label="Test data (empty: the run's own held-out rows)", elem_id="eval-data")
                    eval_rows = gr.Number(20, label="Rows", precision=0, elem_id="eval-rows")
                    eval_tokens = gr.Number(64, label="Max new tokens", precision=0, elem_id="eval-tokens")
                eval_btn = gr.Button("Evaluate the run against its base", variant="primary", elem_id="eval")
                eval_status = gr.Markdown(elem_id="eval-status")
                eval_md = gr.Markdown(elem_id="eval-report")
                eval_images = gr.Gallery(label="Plots", columns=2, height=320)

            # --- Export & serve ----------------------------------------------------------------------------
            with gr.Tab("Export & serve", id="export"):
                with gr.Row():
                    export_to = gr.Dropdown(["merged", "gguf", "onnx", "vllm"], value="merged", label="Format")
                    export_kind = gr.Dropdown(stages.kinds("merged"), value="fp32", label="Kind / quantization")
                export_btn = gr.Button("Export and run the release gate", variant="primary", elem_id="export")
                gate_box = gr.Textbox(label="Release gate", lines=8, elem_id="gate")
                export_status = gr.Markdown(elem_id="export-status")
                gr.Markdown("### Serve (OpenAI-compatible API on 127.0.0.1)")
                with gr.Row():
                    serve_port = gr.Number(0, label="Port (0: a free one)", precision=0)
                    serve_key = gr.Textbox(label="API key (optional)", type="password")
                    serve_btn = gr.Button("Start server", elem_id="serve")
                    serve_stop = gr.Button("Stop server", elem_id="serve-stop")
                serve_md = gr.Markdown(elem_id="serve-status")

        # --- wiring ----------------------------------------------------------------------------------------
        def form(*values) -> train_form.TrainForm:
            keys = [f.name for f in dataclasses.fields(train_form.TrainForm)]  # form_inputs is in this order
            return train_form.TrainForm(**{k: v if v is not None else "" for k, v in zip(keys, values)})

        def on_check(*values):
            c = train_form.check(form(*values), ws)
            detected = f"\n\nData format: **{c.format}**" if c.format else ""
            return c.summary() + detected, c.lint, c.plan, c.preview_html, c.yaml

        check_btn.click(on_check, form_inputs, [check_md, lint_box, plan_box, preview, yaml_box])

        def on_start(*values):
            c = train_form.check(form(*values), ws)
            if not c.ok:
                return c.summary(), gr.update()
            job = train_form.start(form(*values), ws, jobs)
            name = Path(job.run).name
            return f"Started **{name}**: follow it in Runs.", gr.update(choices=runs.names(ws, jobs), value=name)

        start_btn.click(safe(on_start, 2), form_inputs, [start_md, run_pick])

        def on_upload(file):
            if file is None:
                return gr.update()
            return ws.relative(_keep_upload(ws, Path(file if isinstance(file, str) else file.name)))

        upload.upload(safe(on_upload, 1, to=lambda m: gr.update()), upload, data)

        def on_tick(selected, shown):
            values = _page_state(ws, jobs, selected)
            # only what changed goes to the browser: redrawing an unchanged plot every tick costs CPU that a
            # 2-core laptop's training needs
            keys = [_key(v) for v in values]
            out = [gr.skip() if shown.get(i) == k else v for i, (k, v) in enumerate(zip(keys, values))]
            return [*out, dict(enumerate(keys))]

        tick_outputs = [table, run_pick, progress_md, plot, log_box, config_box, eval_status, gate_box, export_status]
        tick_outputs += [serve_md, shown]
        timer = gr.Timer(REFRESH_S)
        for event in (timer.tick, run_pick.change, page.load):
            event(on_tick, [run_pick, shown], tick_outputs, show_progress="hidden")

        def on_stop(selected):
            return stages.stop(jobs, ws, selected, "train")

        def on_resume(selected):
            job = train_form.resume(ws.run(selected), jobs)
            return f"resuming {Path(job.run).name} from its last checkpoint"

        stop_btn.click(safe(on_stop, 1), run_pick, run_msg)
        resume_btn.click(safe(on_resume, 1), run_pick, run_msg)

        def on_compare(selected):
            paths = [ws.run(s) for s in selected or []]
            if len(paths) < 2:
                return gr.update(value=[["pick two or more runs"]], headers=["compare"]), None
            headers = ["setting", *(p.name for p in paths)]
            points = runs.curves(paths)
            return gr.update(value=runs.compare(paths), headers=headers), _frame(points)

        compare_btn.click(safe(on_compare, 2), compare_pick, [compare_table, compare_plot])
        compare_pick.focus(lambda: gr.update(choices=runs.names(ws)), None, compare_pick)

        def on_send(text, left_choice, right_choice, hl, hr, pre, mx, temp, sys, *profile):
            if not (text or "").strip():
                yield hl, hr, "", gr.update()
                return
            settings = dict(preset=pre, max_new_tokens=mx, temperature=temp, system=sys)
            settings["profile"] = chat.profile_fields(*profile) or None
            t0, a, b = time.perf_counter(), hl, hr
            try:
                for a, b in chat.stream_pair(models, left_choice, right_choice, hl or [], hr or [], text, **settings):
                    yield a, b, "", "answering ..."
            except AyarError as e:
                yield hl, hr, text, f"**{e}**"
                return
            yield a, b, "", f"answered in {time.perf_counter() - t0:.1f} s"

        chat_inputs = [prompt, left, right, left_box, right_box, preset, max_new, temperature, system]
        chat_inputs += [p_name, p_expertise, p_interests, p_tone, p_language, p_notes]
        chat_outputs = [left_box, right_box, prompt, chat_msg]
        send.click(on_send, chat_inputs, chat_outputs)
        prompt.submit(on_send, chat_inputs, chat_outputs)
        clear.click(lambda: ([], [], ""), None, [left_box, right_box, chat_msg])
        refresh_models.click(
            lambda a, b: (gr.update(choices=chat.choices(ws), value=a), gr.update(choices=chat.choices(ws), value=b)),
            [left, right],
            [left, right],
        )

        def pair_for(selected, current):
            """A finished run picked above sets Chat to that run beside its base (the question a user asks first),
            unless Chat already has a run of the user's choosing."""
            names = chat.choices(ws)
            if selected not in names or current not in ("default", None, ""):
                return gr.update(choices=names), gr.update(choices=names)
            return gr.update(choices=names, value=selected), gr.update(choices=names, value=chat.BASE)

        run_pick.change(pair_for, [run_pick, left], [left, right], show_progress="hidden")
        chat_tab.select(pair_for, [run_pick, left], [left, right], show_progress="hidden")

        def on_eval(selected, test, rows, tokens):
            stages.start_eval(ws, jobs, selected, test, rows, tokens)
            return "evaluation started (it loads both models, then generates): the status updates below"

        eval_btn.click(safe(on_eval, 1), [run_pick, eval_data, eval_rows, eval_tokens], eval_status)

        def on_report(selected):
            if not selected:
                return "", []
            return stages.eval_report(ws, selected)

        eval_status.change(safe(on_report, 2, to=lambda m: (m, [])), run_pick, [eval_md, eval_images])

        export_to.change(
            lambda to: gr.update(choices=stages.kinds(to), value=stages.kinds(to)[0] if stages.kinds(to) else None),
            export_to,
            export_kind,
        )

        def on_export(selected, to, kind):
            stages.start_export(ws, jobs, selected, to, kind)
            return f"exporting {to} {kind}, then the release gate: the lines appear above when it is done"

        export_btn.click(safe(on_export, 1), [run_pick, export_to, export_kind], export_status)

        def on_serve(selected, port, key):
            job = stages.start_serve(ws, jobs, selected, port, key)
            return f"starting the server on 127.0.0.1:{job.port} ..."

        serve_btn.click(safe(on_serve, 1), [run_pick, serve_port, serve_key], serve_md)
        serve_stop.click(safe(lambda s: stages.stop(jobs, ws, s, "serve"), 1), run_pick, serve_md)
    page.ayar_jobs = jobs
    return page


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    root: str | Path = ".",
    runs_dir: str | Path = "runs",
    auth_file: str | Path | None = None,
    block: bool = True,
):
    """Serve the UI. Bound to 127.0.0.1 by default; any other address needs `auth_file` (lines `user:password`,
    or `user:sha256:<hex of the password's sha256>`)."""
    import gradio as gr

    auth = read_auth(auth_file) if auth_file else None
    if not _loopback(host) and auth is None:
        raise AyarError(
            f"--host {host} makes the UI reachable from other machines: give --auth FILE (lines user:password) "
            "or keep the default 127.0.0.1"
        )
    ws = Workspace.open(root, runs_dir)
    page = build(ws)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.queue(default_concurrency_limit=4)
    page.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        theme=theme,
        footer_links=[],
        allowed_paths=[str(ws.runs)],
        quiet=True,
        prevent_thread_lock=not block,
        ssr_mode=False,
    )
    return page


def read_auth(path: str | Path):
    """A checker for gradio's login from a file of `user:password` or `user:sha256:<hex>` lines."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise AyarError(f"--auth {path}: cannot read it ({e.strerror})") from None
    users = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        if not sep or not user or not secret:
            raise AyarError(f"{path}:{n}: write `user:password` (or `user:sha256:<hex>`)")
        users[user] = secret
    if not users:
        raise AyarError(f"--auth {path}: no `user:password` lines")

    def check(user: str, password: str) -> bool:
        secret = users.get(user)
        if secret is None:
            return False
        if secret.startswith("sha256:"):
            return hmac.compare_digest(secret[7:], hashlib.sha256(password.encode()).hexdigest())
        return hmac.compare_digest(secret, password)

    return check


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keep_upload(ws: Workspace, file: Path) -> Path:
    """An uploaded file copied into the workspace's uploads/ (a new name rather than over an existing file)."""
    ws.uploads.mkdir(parents=True, exist_ok=True)
    target = ws.uploads / file.name
    n = 1
    while target.exists():
        n += 1
        target = ws.uploads / f"{file.stem}-{n}{file.suffix}"
    shutil.copyfile(file, target)
    return target


def _page_state(ws: Workspace, jobs: Jobs, selected: str | None) -> list:
    """What the refresh shows: the run table and picker, then the selected run's progress, loss curve, log, config,
    evaluation status, gate lines, export status and server status."""
    import gradio as gr

    names = runs.names(ws, jobs)
    selected = selected or (names[0] if names else None)
    head = [runs.table(ws, jobs), gr.update(choices=names, value=selected)]
    if not selected:
        return head + ["no runs yet: start one in Train", _frame([]), "", "", "", "", "", ""]
    try:
        path = ws.run(selected)
    except AyarError:  # a run still being set up: its process has not written run.json yet
        path = ws.runs / selected
    job = jobs.latest(path, "train")
    on_disk = (path / "run.json").is_file()
    return head + [
        runs.progress(path, jobs).line(),
        _frame(runs.curves([path], "run")),
        stages._plain(jobs.tail(job)) if job is not None else "",
        runs.config_text(path),
        stages.job_status(jobs, path, "eval", 6),
        stages.gate_lines(ws, jobs, selected) if on_disk else "",
        stages.job_status(jobs, path, "export", 6),
        _serve_status(jobs, path),
    ]


def _key(value) -> str:
    """A comparable digest of an output value (a frame, a component update, text)."""
    import json

    if hasattr(value, "to_json"):
        return value.to_json()
    return json.dumps(value, sort_keys=True, default=str)


def _frame(points: list[dict]):
    import pandas as pd

    # typed even when empty: the plot takes its scales from the column types (object columns plot as categories)
    frame = pd.DataFrame(points or [], columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64", "series": "string"})


def _serve_status(jobs: Jobs, run: Path) -> str:
    job = jobs.latest(run, "serve")
    if job is None:
        return "no server for this run"
    if not jobs.alive(job):
        return stages.job_status(jobs, run, "serve", 8)
    key = job.args.get("key", "")
    names = stages.served_models(job.port, key)
    if not names:  # not answering yet, or answering while the model still loads (no names yet)
        return f"server starting on 127.0.0.1:{job.port} (loading the model) ..."
    return f"**serving** on http://127.0.0.1:{job.port}/v1 (models: {', '.join(names)})\n\n" + stages.snippets(
        job.port,
        names[-1],
        key,  # the run itself (its adapter), after `base`
    )


def _safe(fn, n_outputs: int, to=None):
    """A handler whose AyarError (a user's mistake, with its fix) shows in the page instead of a traceback."""

    def wrapped(*args):
        try:
            return fn(*args)
        except AyarError as e:
            message = f"**{e}**"
            if to is not None:
                return to(message)
            if n_outputs == 1:
                return message
            import gradio as gr

            return (message, *([gr.update()] * (n_outputs - 1)))

    return wrapped

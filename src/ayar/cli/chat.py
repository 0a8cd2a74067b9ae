"""Chat with a fine-tuned run or a model.

examples:
  ayar chat runs/quickstart-20261125-101500
  ayar chat runs/quickstart-20261125-101500 --prompt "What is 12 * 7?"
  ayar chat default --preset creative --temperature 0.7

In the REPL: /reset clears the history, /system TEXT sets the system message, /exit quits.
"""


def add_arguments(p) -> None:
    p.add_argument("source", help="run directory, local model directory, or `default`")
    p.add_argument("--prompt", help="ask one question, print the answer, exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--preset", choices=("deterministic", "creative"), help="generation preset (default: the run's)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)


def run(args) -> int:
    import sys

    from rich.console import Console

    from ayar.infer.load import load_engine

    console = Console(stderr=True)
    engine = load_engine(args.source, log=console.print)
    overrides = {
        "preset": args.preset,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }
    system = args.system
    history: list[dict] = []

    def ask(text: str) -> None:
        messages = (
            ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": text}]
        )
        for piece in engine.stream(messages, **overrides):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        reply = engine.last
        if not reply.stopped:
            console.print(
                f"[yellow](no end-of-turn token within {reply.new_tokens} new tokens: the answer was cut at the "
                "budget)[/]"
            )
        history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}])

    if args.prompt is not None:
        ask(args.prompt)
        return 0
    console.print(f"chatting with {args.source}  (/reset, /system TEXT, /exit)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            console.print("(history cleared)")
            continue
        if text.startswith("/system"):
            system = text.removeprefix("/system").strip() or None
            history.clear()
            console.print(f"(system message {'set' if system else 'cleared'}; history cleared)")
            continue
        ask(text)

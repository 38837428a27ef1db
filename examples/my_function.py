"""Your own function: a module with a handler. Deploy with examples/my_function.yaml."""

from hearth.sdk import Event


def handle(event: Event) -> dict:
    words = event.text().split()
    return {"words": len(words), "longest": max(words, key=len) if words else None}

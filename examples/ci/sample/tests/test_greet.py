from greet import greeting


def test_greets_by_name() -> None:
    assert greeting("Ada") == "Hello, Ada!"


def test_greets_the_world_by_default() -> None:
    assert greeting("  ") == "Hello, world!"

"""Small arithmetic every layer shares."""


def cdiv(a: int, b: int) -> int:
    """a / b rounded up, for non-negative a and positive b."""
    return -(-a // b)

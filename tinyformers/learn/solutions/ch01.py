"""Chapter 1: numbers, vectors and matrices (docs/learn/01-numbers-vectors-matrices.md).

Write the body of each function with plain Python lists and loops (no torch), then run
`tinyformers learn check 1`. A vector is a list of numbers; a matrix is a list of rows.
"""


def dot(a: list[float], b: list[float]) -> float:
    """The dot product of two vectors of the same length: multiply them number by number,
    then add up the products. Example: dot([1, 2], [3, 4]) == 1*3 + 2*4 == 11."""
    total = 0.0
    for i in range(len(a)):
        total += a[i] * b[i]
    return total


def matvec(M: list[list[float]], x: list[float]) -> list[float]:
    """The matrix M (m rows of n numbers) times the vector x (n numbers): a vector of m
    numbers, the dot product of each row of M with x.
    Example: matvec([[1, 2], [3, 4]], [5, 6]) == [17, 39]."""
    return [dot(row, x) for row in M]


def matmul(A: list[list[float]], B: list[list[float]]) -> list[list[float]]:
    """The matrix A (m rows, n columns) times the matrix B (n rows, p columns): m rows of p
    numbers. The number in row i, column j is the dot product of row i of A with column j
    of B. Example: matmul([[1, 2]], [[3], [4]]) == [[11]]."""
    columns = [[row[j] for row in B] for j in range(len(B[0]))]  # column j of B, as a list
    return [[dot(row, column) for column in columns] for row in A]

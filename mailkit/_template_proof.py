"""Which templates cannot fail to render: the preflight's shortcut.

The preflight renders every recipient with every variant before a campaign sends, to find the
recipients a template fails for; the campaign then renders them all again to send. Most
campaign templates only print the recipient's fields, loop over literal lists and count with
``loop.index``: such a template fails for a recipient exactly when one of the fields it reads is
missing (``StrictUndefined``). ``is_infallible`` recognises that shape on the parsed template,
conservatively, from an allow-list of Jinja nodes; for those the preflight checks the fields
instead of rendering, and still renders any recipient who lacks one, so the errors it reports
are the renderer's own. Anything outside the allow-list (filters, tests, calls, conditions,
division, attribute access on recipient data, loops over recipient data, macros, includes)
makes the template "may fail", and every recipient is rendered as before.
"""

from __future__ import annotations

from jinja2 import nodes

__all__ = ["has_literal_text", "is_infallible"]

# ``loop`` attributes that are always ints while a for loop runs.
_LOOP_NUMBERS = frozenset({"index", "index0", "revindex", "revindex0", "length"})
_INT_OPERATORS = (nodes.Add, nodes.Sub, nodes.Mul)


def is_infallible(tree: nodes.Template) -> bool:
    """True when rendering ``tree`` cannot raise for any context that defines every variable
    the template reads from it (``meta.find_undeclared_variables``)."""
    return _Proof().statements(tree.body, in_loop=False)


def has_literal_text(tree: nodes.Template) -> bool:
    """True when the template always outputs some non-blank literal text (outside any loop):
    a subject that cannot render empty."""
    return any(
        isinstance(child, nodes.TemplateData) and child.data.strip()
        for node in tree.body
        if isinstance(node, nodes.Output)
        for child in node.nodes
    )


class _Proof:
    def __init__(self) -> None:
        # Names bound by {% set %} to a literal list: the only things a loop may iterate.
        self.literal_lists: set[str] = set()
        self.locals: set[str] = set()

    def statements(self, body: list[nodes.Node], *, in_loop: bool) -> bool:
        return all(self.statement(node, in_loop=in_loop) for node in body)

    def statement(self, node: nodes.Node, *, in_loop: bool) -> bool:
        if isinstance(node, nodes.Output):
            return all(
                isinstance(child, nodes.TemplateData) or self.printable(child, in_loop=in_loop)
                for child in node.nodes
            )
        if isinstance(node, nodes.Assign):
            if not (isinstance(node.target, nodes.Name) and _literal(node.node)):
                return False
            name = node.target.name
            if name in self.literal_lists or name in self.locals or name == "loop":
                return False  # rebinding: keep the proof simple
            if isinstance(node.node, nodes.List):
                self.literal_lists.add(name)
            else:
                self.locals.add(name)
            return True
        if isinstance(node, nodes.For):
            if (
                node.else_
                or node.test is not None
                or node.recursive
                or not isinstance(node.target, nodes.Name)
                or node.target.name == "loop"
                or not self.iterable(node.iter)
            ):
                return False
            # What the body binds stays in the body (Jinja's scoping): after the loop those
            # names are looked up in the context again.
            outer = set(self.literal_lists), set(self.locals)
            self.locals.add(node.target.name)
            proven = self.statements(node.body, in_loop=True)
            self.literal_lists, self.locals = outer
            return proven
        return False

    def iterable(self, node: nodes.Node) -> bool:
        if isinstance(node, nodes.List):
            return _literal(node)
        return isinstance(node, nodes.Name) and node.name in self.literal_lists

    def printable(self, node: nodes.Node, *, in_loop: bool) -> bool:
        """An expression whose value prints without error: a variable (the context's own, a
        loop item or a literal), a literal, or integer arithmetic on loop counters."""
        if isinstance(node, nodes.Name):
            return node.ctx == "load" and node.name != "loop"
        if isinstance(node, nodes.Const):
            return isinstance(node.value, str | int | float | bool) or node.value is None
        return self.integer(node, in_loop=in_loop)

    def integer(self, node: nodes.Node, *, in_loop: bool) -> bool:
        if isinstance(node, nodes.Const):
            return type(node.value) is int
        if isinstance(node, nodes.Getattr):
            return (
                in_loop
                and isinstance(node.node, nodes.Name)
                and node.node.name == "loop"
                and node.attr in _LOOP_NUMBERS
            )
        if isinstance(node, _INT_OPERATORS):
            return self.integer(node.left, in_loop=in_loop) and self.integer(
                node.right, in_loop=in_loop
            )
        return False


def _literal(node: nodes.Node) -> bool:
    if isinstance(node, nodes.Const):
        return isinstance(node.value, str | int | float | bool) or node.value is None
    if isinstance(node, nodes.List):
        return all(
            isinstance(item, nodes.Const)
            and (isinstance(item.value, str | int | float | bool) or item.value is None)
            for item in node.items
        )
    return False

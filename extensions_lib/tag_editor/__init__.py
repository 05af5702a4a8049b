"""The tag editor's core, without gradio: a dataset's captions as tag lists, filters, counts, batch edits
with a preview, and an undo/redo journal over atomic saves. The tab (`ui/tab_tag_editor.py`), the
`alchemy tags` command and the HTTP routes all drive :class:`TagEditor`."""
from .captions import join_tags, split_tags
from .edits import Edit, apply_edit
from .filters import TagFilter
from .session import ApplyResult, Change, TagEditor
from .stats import sort_tags, tag_counts

__all__ = ["ApplyResult", "Change", "Edit", "TagEditor", "TagFilter", "apply_edit", "join_tags", "sort_tags",
           "split_tags", "tag_counts"]

"""Display: what people see of a run or a saved report: terminal tables, heat map, HTML."""

"""What a process may use and how its children are kept: the CPU quota, lifelines to child groups."""

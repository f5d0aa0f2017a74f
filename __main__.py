"""The Pulumi program: read the stack config once, build Args, create components, export.

Cloud and edge components arrive with their issues; until then the program
only validates that it imports and exports the project name.
"""

import pulumi

pulumi.export("project", pulumi.get_project())

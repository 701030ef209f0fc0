// The application shell (filled in by the UI modules).
export function startApp(root: HTMLElement | null): void {
  if (root === null) return;
  root.textContent = "Conclave";
}

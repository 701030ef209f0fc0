// Entry point of the browser client.
import { startApp } from "./app.js";

startApp(document.getElementById("app"));
